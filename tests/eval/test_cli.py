"""leanformers-eval: lm-eval's CLI on MPIFA folders, SST adapters and CHTss checkpoints, offline.

Each CLI result is checked against ``zero_shot`` on the same model in memory: the folder must load
as the model it was saved from (not, say, a dense or randomly initialised stand-in).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from leanformers.eval.cli import main  # noqa: E402
from leanformers.eval.zeroshot import accuracy_table, zero_shot  # noqa: E402
from tests.eval.conftest import tiny_lm  # noqa: E402

LIMIT = 6
pytestmark = pytest.mark.slow  # each CLI call indexes lm-eval's task files (seconds)


def _cli(tmp_path, model_args: str, tasks: str, *extra: str) -> dict:
    out = tmp_path / "lm-eval-out"
    rc = main(
        [
            "--model",
            "hf",
            "--model_args",
            model_args,
            "--tasks",
            tasks,
            "--limit",
            str(LIMIT),
            "--batch_size",
            "8",
            "--output_path",
            str(out),
            *extra,
        ]
    )
    assert rc == 0
    (path,) = out.rglob("results_*.json")
    return json.loads(path.read_text())


def _close(cli: dict, memory: dict) -> None:
    a, b = accuracy_table(cli), accuracy_table(memory)
    assert a.keys() == b.keys()
    for task in a:
        for metric, value in b[task].items():
            assert a[task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, metric)


def test_mpifa_folder_through_the_cli_equals_the_model_in_memory(mpifa_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanformers import PIFALinear

    tasks = "arc_easy,piqa,winogrande,lambada_openai"
    cli = _cli(tmp_path, f"pretrained={mpifa_folder},dtype=float32", tasks)
    table = capsys.readouterr().out
    for task in tasks.split(","):
        assert f"|{task}" in table  # lm-eval's own results table
    assert cli["n-samples"]["piqa"]["effective"] == LIMIT
    model = AutoModelForCausalLM.from_pretrained(mpifa_folder, dtype=torch.float32)
    assert any(isinstance(m, PIFALinear) for m in model.modules())
    memory = zero_shot(model, AutoTokenizer.from_pretrained(mpifa_folder), tasks, limit=LIMIT)
    _close(cli, memory)


def test_sst_adapter_through_peft_argument(dense_folder, tokenizer, tmp_path):
    from peft import get_peft_model

    import leanformers

    base = tiny_lm(len(tokenizer))
    model = get_peft_model(
        base, leanformers.SSTConfig(r=4, steps_per_iteration=2, warmup_steps_per_iteration=1)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    controller = leanformers.SSTController(model, optimizer)
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
    model.eval()
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)

    cli = _cli(tmp_path, f"pretrained={dense_folder},peft={adapter},dtype=float32", "lambada_openai")
    memory = zero_shot(model, tokenizer, ["lambada_openai"], limit=LIMIT)
    _close(cli, memory)
    dense = zero_shot(tiny_lm(len(tokenizer)), tokenizer, ["lambada_openai"], limit=LIMIT)
    # the adapter was applied: its perplexity is not the base model's
    assert accuracy_table(cli)["lambada_openai"]["perplexity"] != pytest.approx(
        accuracy_table(dense)["lambada_openai"]["perplexity"], rel=1e-3
    )


def test_chtss_trained_checkpoint(smollm2_path, tokenizer, tmp_path):
    from leanformers.train import run

    recipe = {
        "model": {
            "config": {
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 96,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 256,
                "tie_word_embeddings": False,
            }
        },
        "tokenizer": str(smollm2_path),
        "data": {"train": "shared:tinyshakespeare.txt", "block_size": 64, "max_train_tokens": 4096},
        "method": {
            "name": "chtss",
            "chtss": {"final_density": 0.3, "initial_density": 0.5, "update_interval": 2},
        },
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "use_cpu": True,
            "disable_tqdm": True,
        },
    }
    trained = run(recipe)["model"].eval()
    final = tmp_path / "run" / "final"
    weight = trained.model.layers[0].mlp.up_proj.weight
    assert (weight == 0).float().mean().item() > 0.5  # a sparse checkpoint
    assert (final / "tokenizer.json").is_file()  # the checkpoint loads by itself
    cli = _cli(tmp_path, f"pretrained={final},dtype=float32", "lambada_openai,piqa")
    _close(cli, zero_shot(trained, tokenizer, ["lambada_openai", "piqa"], limit=LIMIT))


def test_bad_input_is_a_clear_error(tmp_path, dense_folder, capsys):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    base = ["--model", "hf", "--tasks", "arc_easy", "--limit", "2"]
    assert main([*base, "--model_args", f"pretrained={not_a_model}"]) == 2
    assert "is not a model folder (no config.json); pass a folder written by" in capsys.readouterr().err
    assert main([*base, "--model_args", f"pretrained={dense_folder}", "--data-dir", str(tmp_path / "x")]) == 2
    assert "does not exist; pass --data-dir" in capsys.readouterr().err
    assert main(["--model", "hf", "--model_args", f"pretrained={dense_folder}", "--tasks", "arc_eazy"]) == 2
    err = capsys.readouterr().err
    assert "arc_eazy" in err and "leanformers-eval ls tasks" in err
