"""Block layout of any decoder: the table is a fast path that inference must reproduce; every other
model (Gemma 3, Phi-3, OLMo 2, Llama-3-style, Qwen 3) is inferred and compresses through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from leanformers.compression.cli import main
from leanformers.compression.layout import ARCHITECTURES, find_layout, infer_layout
from leanformers.compression.options import parse_groups
from leanformers.compressors.mpifa import MPIFAConfig, mpifa_compress
from tests.compression.tiny_decoders import DECODERS
from tests.helpers import mpifa_cli_args
from tests.tiny_models import random_ids, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt, tiny_qwen2

TABLE_FAMILIES = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "opt": tiny_opt,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
}
LLAMA_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


@pytest.mark.parametrize("family", list(TABLE_FAMILIES))
def test_inference_agrees_with_the_table(family):
    """The known-family table is kept only as a fast path: inference gives the very same layout."""
    model = TABLE_FAMILIES[family](seed=1)
    assert model.config.model_type in ARCHITECTURES
    table, table_blocks = find_layout(model)
    inferred, blocks = infer_layout(model)
    assert blocks is table_blocks
    assert inferred.groups == table.groups
    assert sorted(inferred.attention) == sorted(table.attention)
    assert inferred.mlp_chain == table.mlp_chain
    assert inferred.blocks_path in (table.blocks_path, table.blocks_path.partition(".")[2])


@pytest.mark.parametrize("family", list(DECODERS))
def test_layout_of_decoders_outside_the_table(family):
    model = DECODERS[family](seed=1)
    layout, blocks = infer_layout(model)
    assert blocks is model.model.layers and layout.blocks_path == "model.layers"
    if family == "phi3":  # fused projections: one linear per group, no scatter-free chain (2x width)
        assert layout.groups == [
            ["self_attn.qkv_proj"],
            ["self_attn.o_proj"],
            ["mlp.gate_up_proj"],
            ["mlp.down_proj"],
        ]
        assert layout.mlp_chain is None
    else:
        assert layout.groups == LLAMA_GROUPS
        assert layout.mlp_chain == (["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj")
    assert layout.attention == [n for g in layout.groups[:2] for n in g]
    assert find_layout(model)[0] == layout  # not in the table: find_layout infers


def test_chain_is_verified_by_permutation_not_assumed():
    """A consumer that does not read the producers' channels element-wise gets no chain."""
    model = tiny_llama(seed=2)

    class Mix(nn.Module):  # down_proj(roll(act(gate) * up)): channel order matters
        def __init__(self, mlp):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj, self.act = (
                mlp.gate_proj,
                mlp.up_proj,
                mlp.down_proj,
                mlp.act_fn,
            )

        def forward(self, x):
            return self.down_proj(torch.roll(self.act(self.gate_proj(x)) * self.up_proj(x), 1, dims=-1))

    for layer in model.model.layers:
        layer.mlp = Mix(layer.mlp)
    model.config.model_type = "rolled_llama"
    layout, _ = find_layout(model)
    assert layout.groups == LLAMA_GROUPS and layout.mlp_chain is None
    ref = model(random_ids(2, 9)).logits
    mpifa_compress(
        model, None, MPIFAConfig(density=1.0, alpha=0.0, steps=0), random_ids(4, 16), progress=False
    )
    assert torch.allclose(model(random_ids(2, 9)).logits, ref, atol=1e-4)  # full rank: same function


def test_groups_override_parsing():
    assert parse_groups("a.q,a.k, a.v; a.o;m.up;m.down") == [
        ["a.q", "a.k", "a.v"],
        ["a.o"],
        ["m.up"],
        ["m.down"],
    ]
    assert parse_groups([["a", "b"], "c"]) == [["a", "b"], ["c"]]
    assert parse_groups(None) is None
    with pytest.raises(ValueError, match="names no module"):
        parse_groups(" ; ")


def test_already_compressed_model_is_refused_clearly():
    model = tiny_llama(seed=3)
    mpifa_compress(model, None, MPIFAConfig(density=0.5), random_ids(4, 16), progress=False)
    with pytest.raises(ValueError, match="already MPIFA-compressed.*dequantize"):
        mpifa_compress(model, None, MPIFAConfig(density=0.5), random_ids(4, 16), progress=False)


# ---- through the CLI, on folders saved with a real tokenizer ----------------------------------------


@pytest.fixture(scope="module")
def decoder_folders(tmp_path_factory, smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    root = tmp_path_factory.mktemp("decoders")
    for family, build in DECODERS.items():
        build(seed=0, vocab=len(tokenizer)).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    return root


def _cli_args(src, out, shared_data, *extra):
    return mpifa_cli_args(src, out, shared_data, "--dtype", "float32", *extra)


@pytest.mark.slow
def test_cli_compresses_any_decoder_and_reloads_exactly_in_a_fresh_process(
    decoder_folders, shared_data, tmp_path
):
    """Issue 10 acceptance 6: Gemma 3, Phi-3, OLMo 2, Llama-3-style and Qwen 3 compress through
    mpifa-compress with no layout given, and a fresh process reproduces the compressed model's
    perplexity bit for bit (same weights, same code, same thread count)."""
    test_text = shared_data / "wikitext-2-raw-test.txt"
    expected = {}
    for family in DECODERS:
        out, report = tmp_path / family, tmp_path / f"{family}.json"
        args = _cli_args(
            decoder_folders / family, out, shared_data, "--density", "0.5", "--eval", str(test_text)
        )
        rc = main([*args, "--eval-seqlen", "64", "--eval-tokens", "256", "--report", str(report)])
        assert rc == 0, family
        data = json.loads(report.read_text())
        assert data["report"]["achieved_density"] <= 0.5
        n_linears = 2 * (4 if family == "phi3" else 7)
        assert (
            len(json.loads((out / "config.json").read_text())["quantization_config"]["modules"]) == n_linears
        )
        expected[family] = data["perplexity"]["after"]["ppl"]
    script = textwrap.dedent(f"""
        import json, torch, leanformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from leanformers.data import load_text, tokenize_text
        torch.set_num_threads({torch.get_num_threads()})
        result = {{}}
        for family in {list(DECODERS)!r}:
            folder = {str(tmp_path)!r} + "/" + family
            model = AutoModelForCausalLM.from_pretrained(folder)
            ids = tokenize_text(load_text({str(test_text)!r}), AutoTokenizer.from_pretrained(folder))
            ppl = leanformers.perplexity(model, text=ids, seqlen=64, max_tokens=256, progress=False).ppl
            n = sum(type(m).__name__ == "PIFALinear" for m in model.modules())
            result[family] = [ppl, n]
        print("RESULT" + json.dumps(result))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.split("RESULT", 1)[1])
    for family, (ppl, n) in fresh.items():
        assert n == 2 * (4 if family == "phi3" else 7), family
        assert ppl == expected[family], (family, ppl, expected[family])


@pytest.mark.slow
def test_unsupported_or_compressed_models_fail_before_any_evaluation_or_calibration(
    decoder_folders, shared_data, tmp_path, capsys
):
    """Issue 10: the layout is validated before the dense perplexity and the calibration. A global
    forward hook on every embedding sees every pass: only the 8-token layout probe may run."""
    seen: list[int] = []

    def count(module, args, kwargs):
        if isinstance(module, nn.Embedding):
            ids = args[0] if args else kwargs.get("input")
            seen.append(int(ids.numel()))

    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, a: count(m, a, {}))
    try:
        test_text = str(shared_data / "wikitext-2-raw-test.txt")
        src = decoder_folders / "qwen3"
        bad = [
            ("--blocks-path", "model.nowhere", "no non-empty ModuleList at model.nowhere"),
            ("--groups", "self_attn.q_proj;mlp.nope", "no linear layer at 'mlp.nope'"),
        ]
        for flag, value, message in bad:
            seen.clear()
            rc = main(_cli_args(src, tmp_path / "o", shared_data, "--eval", test_text, flag, value))
            assert rc == 1 and message in capsys.readouterr().err, (flag, value)
            assert all(n <= 8 for n in seen), seen  # at most the probe, never the eval text
            assert not (tmp_path / "o").exists()
        # compress once, then try to compress the result again
        assert main(_cli_args(src, tmp_path / "once", shared_data)) == 0
        capsys.readouterr()
        seen.clear()
        rc = main(_cli_args(tmp_path / "once", tmp_path / "twice", shared_data, "--eval", test_text))
        err = capsys.readouterr().err
        assert rc == 1 and "already MPIFA-compressed" in err and "dequantize" in err, err[-2000:]
        assert seen == []  # refused before even the probe
    finally:
        handle.remove()
