"""Save / reload of MPIFA checkpoints through transformers, and the guard for processes that did not
``import leanformers``."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from leanformers._compat import is_conv1d
from leanformers.storage.integration import compressed_modules, dequantize_model, replace_with_pifa_layers
from leanformers.storage.layers import LowRankLinear, PIFALinear
from leanformers.storage.quantization_config import MPIFAQuantizationConfig
from leanformers.storage.quantizer import MPIFAHfQuantizer
from leanformers.storage.saving import save_compressed
from tests.helpers import run_python
from tests.tiny_models import random_ids, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt, tiny_qwen2

FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "opt": tiny_opt, "gpt2": tiny_gpt2, "bert": tiny_bert}
KINDS = ("column", "row", "lowrank")


def compress_randomly(model: nn.Module, seed: int = 0, rank: int = 8) -> nn.Module:
    """Replace every Linear / Conv1D inside the blocks by a rank-``rank`` layer from random factors,
    cycling through PIFA column form, row form and low-rank. Biases are kept."""
    g = torch.Generator().manual_seed(seed)
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if (isinstance(m, nn.Linear) or is_conv1d(m))
        and (".layers." in name or ".layer." in name or ".h." in name)
    ]
    for i, (name, old) in enumerate(targets):
        if is_conv1d(old):  # Conv1D: y = x W + b with W (in, out); compressed as a Linear of W^T
            n, m = old.weight.shape
        else:
            m, n = old.weight.shape
        U = torch.randn(m, rank, generator=g) / rank**0.5
        V = torch.randn(rank, n, generator=g) / n**0.5
        bias = None if old.bias is None else old.bias.detach().clone()
        kind = KINDS[i % 3]
        new = (
            LowRankLinear.from_factors(U, V, bias)
            if kind == "lowrank"
            else PIFALinear.from_factors(U, V, bias, form=kind)
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every family compressed, saved with save_compressed; reference outputs as safetensors."""
    root = tmp_path_factory.mktemp("mpifa")
    ids = random_ids(2, 12)
    refs = {"ids": ids}
    for family, build in FAMILIES.items():
        model = compress_randomly(build(seed=1))
        refs[family] = _outputs(model, ids)
        if family != "bert":  # what AutoModel (the base model without the LM head) must reproduce
            with torch.no_grad():
                refs[f"{family}_hidden"] = model.base_model(input_ids=ids).last_hidden_state
        save_compressed(model, None, root / family, MPIFAQuantizationConfig(density=0.5, alpha=0.25, steps=2))
    save_file(refs, root / "refs.safetensors")
    return root


@pytest.mark.integration
def test_fresh_process_reload_is_exact_for_every_family(saved):
    """Acceptance #6 / exact reload: a fresh interpreter that imports leanformers gets identical outputs."""
    code = f"""
        import json, torch
        import leanformers
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoModelForCausalLM
        refs = load_file({str(saved / "refs.safetensors")!r})
        result = {{}}
        for family in {list(FAMILIES)!r}:
            auto = AutoModel if family == "bert" else AutoModelForCausalLM
            model = auto.from_pretrained({str(saved)!r} + "/" + family)
            with torch.no_grad():
                out = model(input_ids=refs["ids"])
            out = out.logits if hasattr(out, "logits") else out.last_hidden_state
            kinds = sorted({{type(m).__name__ for m in model.modules() if type(m).__name__ in ("PIFALinear", "LowRankLinear")}})
            result[family] = [bool(torch.equal(out, refs[family])), kinds]
        print("RESULT" + json.dumps(result))
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    for family, (equal, kinds) in result.items():
        assert equal, f"{family}: reloaded outputs differ"
        assert kinds == ["LowRankLinear", "PIFALinear"], family


@pytest.mark.integration
def test_automodel_reloads_a_causal_lm_folder_exactly_in_a_fresh_process(saved):
    """Issue 7: AutoModel on a CausalLM MPIFA folder failed with "no module 'model.layers.0.mlp.down_proj'".
    The base model must load with the module names mapped through base_model_prefix, and its hidden
    states must equal those of the compressed CausalLM's base model."""
    causal = [f for f in FAMILIES if f != "bert"]
    code = f"""
        import json, torch
        import leanformers
        from safetensors.torch import load_file
        from transformers import AutoModel
        refs = load_file({str(saved / "refs.safetensors")!r})
        result = {{}}
        for family in {causal!r}:
            model = AutoModel.from_pretrained({str(saved)!r} + "/" + family)
            with torch.no_grad():
                out = model(input_ids=refs["ids"]).last_hidden_state
            n = sum(type(m).__name__ in ("PIFALinear", "LowRankLinear") for m in model.modules())
            names = sorted(model.config.quantization_config.modules)[:1]
            result[family] = [type(model).__name__, bool(torch.equal(out, refs[family + "_hidden"])), n, names]
        print("RESULT" + json.dumps(result))
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    for family, (cls, equal, n, names) in result.items():
        assert not cls.endswith("ForCausalLM"), (family, cls)
        assert equal, f"{family}: AutoModel hidden states differ from the compressed model's base model"
        expected = len(
            json.loads((saved / family / "config.json").read_text())["quantization_config"]["modules"]
        )
        assert n == expected, (family, n, expected)
        # the config now names this model's modules (no head prefix), so the model re-saves as is
        assert names and not names[0].startswith(("model.", "transformer.")), names


def test_automodel_loaded_folder_saves_again(saved, tmp_path):
    ids = load_file(saved / "refs.safetensors")["ids"]
    model = AutoModel.from_pretrained(saved / "llama")
    ref = _outputs(model, ids)
    out = save_compressed(model, None, tmp_path / "base")
    assert torch.equal(_outputs(AutoModel.from_pretrained(out), ids), ref)
    # and a base-model folder loads into the model with the LM head (names gain the "model." prefix)
    causal = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(causal.model(input_ids=ids).last_hidden_state.detach(), ref)


@pytest.mark.integration
def test_guard_without_import_never_returns_random_weights(saved):
    """Acceptance #2: without `import leanformers` from_pretrained raises instead of returning random layers."""
    code = f"""
        import json
        from transformers import AutoModel, AutoModelForCausalLM
        result = {{}}
        for family in {list(FAMILIES)!r}:
            auto = AutoModel if family == "bert" else AutoModelForCausalLM
            try:
                auto.from_pretrained({str(saved)!r} + "/" + family)
                result[family] = "LOADED"
            except Exception as exc:
                result[family] = type(exc).__name__ + ": " + str(exc)
        print("RESULT" + json.dumps(result))
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    for family, outcome in result.items():
        assert outcome != "LOADED", f"{family} loaded without leanformers: random weights"
        assert outcome.startswith("RuntimeError") and "ignore_mismatched_sizes" in outcome, outcome
    # the log names the quantization method and the mismatching compressed weights
    assert "Unknown quantization type, got mpifa" in proc.stderr
    assert "MISMATCH" in proc.stderr


@pytest.mark.integration
def test_ignore_mismatched_sizes_without_import_is_pinned_and_loud_in_the_log(saved):
    """Issue 7 (b), documented limit (docs/pifa_format.md, "Loading without leanformers"): with
    ``ignore_mismatched_sizes=True`` and no ``import leanformers`` transformers skips the unknown
    quant_method and re-initialises every mismatched weight, as the user asked; no code of ours runs in
    that process. Pinned here: it loads, the log names the method, the fix (the LOAD_HINT key) and every
    compressed weight as a size mismatch; the config keeps quant_method "mpifa" so the model is
    recognisable afterwards. With the import, the same flag loads exactly."""
    code = f"""
        import json, sys, torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        folder = {str(saved / "llama")!r}
        model = AutoModelForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=True)
        refs = load_file({str(saved / "refs.safetensors")!r})
        with torch.no_grad():
            out = model(input_ids=refs["ids"]).logits
        qc = model.config.quantization_config
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        before = [bool(torch.equal(out, refs["llama"])), qc["quant_method"], type(model.model.layers[0].mlp.down_proj).__name__]
        import leanformers
        model = AutoModelForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=True)
        with torch.no_grad():
            out = model(input_ids=refs["ids"]).logits
        print("RESULT" + json.dumps(before + [bool(torch.equal(out, refs["llama"]))]))
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    equal_without, method, cls, equal_with = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert not equal_without and method == "mpifa" and cls == "Linear"  # the documented limit
    assert "Unknown quantization type, got mpifa" in proc.stderr
    assert "import_leanformers_before_from_pretrained" in proc.stderr
    modules = json.loads((saved / "llama" / "config.json").read_text())["quantization_config"]["modules"]
    report = proc.stderr.split("Unknown quantization type", 1)[1]
    for name in {n.rsplit(".", 1)[1] for n in modules}:  # every projection is reported as re-initialised
        assert any(name in line and "MISMATCH" in line for line in report.splitlines()), name
    assert equal_with


def test_folder_holds_safetensors_only_and_config_lists_every_rank(saved):
    """Acceptance #3 (format part): no pickles; quantization_config lists every compressed module's rank."""
    for family in FAMILIES:
        folder = saved / family
        names = sorted(p.name for p in folder.iterdir())
        assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))], (
            names
        )
        assert any(n.endswith(".safetensors") for n in names), names
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "mpifa" and qc["density"] == 0.5 and qc["alpha"] == 0.25
        assert "import leanformers" in qc["requires"]
        tensors = load_file(folder / "model.safetensors")
        for name, spec in qc["modules"].items():
            assert spec["rank"] == 8 and spec["kind"] in ("pifa", "lowrank")
            weight = tensors[f"{name}.weight"]
            dense = (spec["out_features"], spec["in_features"])
            assert tuple(weight.shape) != dense and tuple(weight.shape) != dense[::-1]
            if spec["kind"] == "pifa":
                index = tensors[f"{name}.{'output_index' if spec['form'] == 'row' else 'input_index'}"]
                assert index.dtype == torch.int32


def test_qwen2_biases_survive(saved):
    model = AutoModelForCausalLM.from_pretrained(saved / "qwen2")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, (PIFALinear, LowRankLinear)) and q.bias is not None and q.bias.abs().sum() > 0


def test_dtype_cast_sharding_and_device_map(saved, tmp_path):
    ids = load_file(saved / "refs.safetensors")["ids"]
    ref = load_file(saved / "refs.safetensors")["llama"]
    half = AutoModelForCausalLM.from_pretrained(saved / "llama", dtype=torch.bfloat16)
    layer = next(iter(compressed_modules(half).values()))
    assert layer.weight.dtype == torch.bfloat16
    assert all(b.dtype == torch.int32 for n, b in half.named_buffers() if n.endswith("_index"))
    assert float((_outputs(half, ids).float() - ref).norm() / ref.norm()) < 0.05

    cast = AutoModelForCausalLM.from_pretrained(saved / "llama").to(torch.float16)  # .to(dtype) works
    assert next(iter(compressed_modules(cast).values())).coeff.dtype == torch.float16
    assert all(b.dtype == torch.int32 for n, b in cast.named_buffers() if n.endswith("_index"))
    with pytest.raises(ValueError, match="not supported for quantized model"):
        cast.half()  # transformers' own rule for quantized models

    mapped = AutoModelForCausalLM.from_pretrained(saved / "llama", device_map="auto")
    assert torch.equal(_outputs(mapped, ids), ref)

    model = AutoModelForCausalLM.from_pretrained(saved / "llama")
    sharded = save_compressed(model, None, tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    assert torch.equal(_outputs(AutoModelForCausalLM.from_pretrained(sharded), ids), ref)


def test_dequantize_gives_an_equivalent_dense_model(saved, tmp_path):
    ids = load_file(saved / "refs.safetensors")["ids"]
    ref = load_file(saved / "refs.safetensors")["gpt2"]
    model = AutoModelForCausalLM.from_pretrained(saved / "gpt2")
    assert isinstance(model.hf_quantizer, MPIFAHfQuantizer) and model.is_quantized
    dense = model.dequantize()
    assert not compressed_modules(dense) and not hasattr(dense.config, "quantization_config")
    assert float((_outputs(dense, ids) - ref).norm() / ref.norm()) < 1e-5
    # the dense export reloads anywhere (no leanformers needed) as a plain model
    dense.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert float((_outputs(again, ids) - ref).norm() / ref.norm()) < 1e-5

    in_memory = compress_randomly(tiny_bert(seed=2))
    before = _outputs(in_memory, ids)
    dequantize_model(in_memory)
    assert not compressed_modules(in_memory)
    assert float((_outputs(in_memory, ids) - before).norm() / before.norm()) < 1e-5


def test_fine_tuning_after_reload(saved):
    model = AutoModelForCausalLM.from_pretrained(saved / "opt")
    model.train()
    assert model.hf_quantizer.is_trainable
    ids = random_ids(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    layer = next(iter(compressed_modules(model).values()))
    assert layer.weight.grad is not None


def test_save_refuses_existing_folder_without_overwrite(tmp_path):
    model = compress_randomly(tiny_llama(seed=3, layers=1))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True \\(--overwrite\\)"):
        save_compressed(model, None, out)
    assert (out / "keep.txt").exists()
    save_compressed(model, None, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left behind


def test_save_rejects_full_rank_modules_and_mismatched_configs(tmp_path):
    model = tiny_llama(seed=4, layers=1)
    attn = model.model.layers[0].self_attn
    attn.q_proj = PIFALinear.from_linear(attn.q_proj, 64, form="row")  # 64 x 64 at full rank
    attn.q_proj.permute_outputs_(torch.arange(63, -1, -1))  # its `weight` is no longer the dense W
    with pytest.raises(ValueError, match="stored at full rank"):
        save_compressed(model, None, tmp_path / "a")
    mlp = model.model.layers[0].mlp
    mlp.up_proj = LowRankLinear.from_factors(
        torch.randn(96, 64), torch.randn(64, 64)
    )  # U (96, 64) = dense shape
    attn.q_proj = PIFALinear.from_linear(nn.Linear(64, 64), 8)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj \(rank 64 of 96x64\)"):
        save_compressed(model, None, tmp_path / "a")
    model = compress_randomly(tiny_llama(seed=4, layers=1))
    wrong = MPIFAQuantizationConfig(modules={"model.layers.0.mlp.up_proj": PIFALinear(64, 96, 3).spec()})
    with pytest.raises(ValueError, match="does not match the model's compressed modules"):
        save_compressed(model, None, tmp_path / "b", wrong)
    with pytest.raises(ValueError, match="no compressed module \\(PIFALinear / LowRankLinear\\)"):
        save_compressed(tiny_llama(seed=4, layers=1), None, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_full_rank_pifa_in_dense_order_stores_the_dense_weight(tmp_path):
    """At full rank a sorted-pivot PIFA stores W itself under `weight` (so even a dense load of that module
    is exact); save accepts it, and the reload is exact."""
    model = tiny_llama(seed=7, layers=1)
    mlp = model.model.layers[0].mlp
    mlp.up_proj = PIFALinear.from_linear(mlp.up_proj, 64)  # 96 x 64, full rank, column form
    mlp.down_proj = PIFALinear.from_linear(mlp.down_proj, 16)  # 64 x 96, rank 16
    ids = random_ids(1, 8)
    ref = _outputs(model, ids)
    out = save_compressed(model, None, tmp_path / "full")
    stored = load_file(out / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(stored, mlp.up_proj.to_dense().weight.detach())
    assert torch.equal(_outputs(AutoModelForCausalLM.from_pretrained(out), ids), ref)


def test_config_round_trip_and_errors():
    spec = PIFALinear(64, 96, 8, form="column").spec()
    cfg = MPIFAQuantizationConfig(modules={"a.b": spec}, density=0.6, calibration="wiki", extra={"owl": True})
    d = cfg.to_dict()
    assert d["quant_method"] == "mpifa" and json.loads(json.dumps(d)) == d
    back = MPIFAQuantizationConfig.from_dict(d)
    assert back.to_dict() == d and back.ranks == {"a.b": 8}
    with pytest.raises(ValueError, match="is not a PIFA/low-rank spec"):
        MPIFAQuantizationConfig(modules={"a": {"kind": "int4"}})
    with pytest.raises(ValueError, match="density must be in \\(0, 1\\]"):
        MPIFAQuantizationConfig(density=1.5)


def test_replace_errors_name_the_module():
    model = tiny_llama(seed=5, layers=1)
    with pytest.raises(ValueError, match="no module 'model.layers.7.mlp.up_proj'"):
        replace_with_pifa_layers(model, {"model.layers.7.mlp.up_proj": PIFALinear(64, 96, 4).spec()})
    with pytest.raises(ValueError, match="has \\(out, in\\) = \\(96, 64\\)"):
        replace_with_pifa_layers(model, {"model.layers.0.mlp.up_proj": PIFALinear(64, 64, 4).spec()})
    with pytest.raises(TypeError, match="only nn.Linear and Conv1D"):
        replace_with_pifa_layers(model, {"model.layers.0.mlp": PIFALinear(64, 64, 4).spec()})


def test_dense_checkpoint_cannot_be_quantized_on_load(tmp_path):
    tiny_llama(seed=6, layers=1).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "dense", quantization_config=MPIFAQuantizationConfig()
        )


def test_bert_automodel_reload_in_process(saved):
    ids = load_file(saved / "refs.safetensors")["ids"]
    model = AutoModel.from_pretrained(saved / "bert")
    assert torch.equal(_outputs(model, ids), load_file(saved / "refs.safetensors")["bert"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reload_on_cuda_in_half_precision(saved, dtype):
    refs = load_file(saved / "refs.safetensors")
    model = AutoModelForCausalLM.from_pretrained(saved / "llama", device_map="cuda", dtype=dtype)
    layer = next(iter(compressed_modules(model).values()))
    assert layer.weight.device.type == "cuda" and layer.weight.dtype == dtype
    out = _outputs(model, refs["ids"].cuda()).float().cpu()
    assert float((out - refs["llama"]).norm() / refs["llama"].norm()) < 0.05
