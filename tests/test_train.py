"""leanformers-train: recipes, overrides, methods registry, dense / LoRA / SST runs on a tiny model.

The recipe layer is the package leanformers.recipes (runner, schema, methods, tasks, data, cli);
leanformers.train keeps the console script and the old names as shims (last test)."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest
import torch

from leanformers import recipes
from leanformers.recipes import cli, runner
from leanformers.recipes.data import load_source
from leanformers.recipes.methods import METHODS
from tests.conftest import REPO_ROOT
from tests.helpers import run_command

TINY = {
    "model": {
        "config": {
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 64,
            "tie_word_embeddings": False,
        }
    },
    "tokenizer": "bytes",
    "data": {"train": None, "block_size": 32, "eval_fraction": 0.2},
    "method": {"name": "dense"},
    "training": {
        "output_dir": None,
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "use_cpu": True,
        "report_to": "none",
        "disable_tqdm": True,
    },
}


@pytest.fixture()
def recipe(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(200)))
    r = json.loads(json.dumps(TINY))
    r["data"]["train"] = str(text)
    r["training"]["output_dir"] = str(tmp_path / "out")
    return r


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("dense", {}),
        ("lora", {"r": 4, "train_modules": ["embed_tokens", "lm_head"]}),
        ("sst", {"r": 4, "steps_per_iteration": 2, "warmup_steps_per_iteration": 1}),
    ],
)
def test_methods_train_and_write_results(recipe, name, options, tmp_path):
    recipe["method"] = {"name": name, name: options}
    out = recipes.run(recipe)
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())
    assert metrics["method"] == name and metrics["world_size"] == 1
    assert out["trainer"].state.global_step == 3
    assert 0 < metrics["eval_perplexity"] < 256 * 2
    if name == "lora":
        embed = out["model"].base_model.model.model.embed_tokens.weight
        assert embed.requires_grad
    if name == "sst":
        assert (tmp_path / "out" / "final" / "adapter_config.json").is_file()
        assert metrics["trainable_parameters"] < metrics["model_parameters"]


def test_overrides_and_cli(recipe, tmp_path, capsys):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = recipes.load_training_recipe(path, ["training.max_steps=2", "method.name=sst", "method.sst.r=2"])
    assert loaded["training"]["max_steps"] == 2 and loaded["method"]["sst"] == {"r": 2}
    assert cli.main([str(path), "--set", "training.max_steps=1"]) == 0
    assert '"method": "dense"' in capsys.readouterr().out


def test_methods_registry_is_extensible(recipe):
    seen = {}

    def frozen_embeddings(model, options):
        seen["options"] = options
        model.get_input_embeddings().weight.requires_grad_(False)
        return model, []

    METHODS["frozen_embeddings"] = frozen_embeddings
    try:
        recipe["method"] = {"name": "frozen_embeddings", "frozen_embeddings": {"x": 1}}
        out = recipes.run(recipe)
        assert seen["options"] == {"x": 1}
        assert not out["model"].get_input_embeddings().weight.requires_grad
    finally:
        del METHODS["frozen_embeddings"]


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (
            lambda r: r["method"].update(name="magic"),
            ValueError,
            r"method.name='magic': unknown method \(valid: .*dense.*sst",
        ),
        (lambda r: r.update(extra=1), ValueError, r"extra: unknown recipe section \(valid: data, method"),
        (lambda r: r.pop("data"), ValueError, "the recipe has no 'data' section"),
        (lambda r: r["model"].pop("config"), ValueError, "give either 'config:"),
        (lambda r: r["method"].update(dense={"x": 1}), ValueError, "method.dense: dense takes no options"),
        (lambda r: r["data"].update(block_size=10**6), ValueError, "fewer than one block of 1000000"),
    ],
)
def test_recipe_errors(recipe, mutate, error, message):
    mutate(recipe)
    with pytest.raises(error, match=message):
        recipes.run(recipe)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="--set expects key.sub=value"):
        recipes.load_training_recipe(dict(TINY), ["training.max_steps"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        recipes.load_training_recipe(tmp_path / "nope.yaml")


def test_shipped_recipes_parse_and_tiny_one_runs(tmp_path, shared_data):
    big = recipes.load_training_recipe(REPO_ROOT / "recipes" / "sst_llama130m.yaml")
    assert big["method"]["name"] == "sst" and big["method"]["sst"]["r"] == 64
    out = recipes.run(
        REPO_ROOT / "recipes" / "sst_tiny_cpu.yaml",
        [f"training.output_dir={tmp_path}", "training.max_steps=6", "data.max_train_tokens=20000"],
    )
    assert out["metrics"]["method"] == "sst"
    assert torch.isfinite(torch.tensor(out["metrics"]["eval_loss"]))


def test_stdlib_source_splits_are_disjoint():
    train_text = load_source("stdlib:train")
    eval_text = load_source("stdlib:eval")
    assert len(eval_text) > 10_000 and len(train_text) > 10 * len(eval_text)
    with pytest.raises(ValueError, match="must be 'train' or 'eval'"):
        load_source("stdlib:test")


# ------------------------------------------------------------------ evaluate metrics (translation / classification)
def test_translation_recipe_reports_bleu_and_chrf_of_its_own_generations(tmp_path, shared_data):
    """eval_bleu / eval_chrf are sacrebleu's scores of the model's greedy generations vs the raw targets."""
    pytest.importorskip("evaluate")
    import sacrebleu

    out = recipes.run(
        REPO_ROOT / "recipes" / "translation_tiny_cpu.yaml",
        [f"training.output_dir={tmp_path}", "training.max_steps=4", "data.max_eval_examples=8"],
    )
    trainer, metrics = out["trainer"], out["metrics"]
    assert {"eval_bleu", "eval_chrf", "eval_loss"} <= set(metrics)
    evaluated = trainer.evaluate()
    assert evaluated["eval_bleu"] == pytest.approx(metrics["eval_bleu"])
    # recompute from the model's own generations, outside the Trainer
    tok, model = trainer.processing_class, trainer.model.eval()
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    with torch.no_grad():
        gen = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_length=16, num_beams=1
        )
    hyps = [s.strip() for s in tok.batch_decode(gen, skip_special_tokens=True)]
    refs = [
        line.strip() for line in (shared_data / "translation/multi30k/val.de").read_text().splitlines()[:8]
    ]
    assert metrics["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-6)
    assert metrics["eval_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-6)
    assert 0 < metrics["eval_chrf"] <= 100


def test_classification_recipe_reports_accuracy_and_f1(tmp_path, shared_data):
    pytest.importorskip("evaluate")
    from sklearn.metrics import f1_score

    out = recipes.run(
        REPO_ROOT / "recipes" / "classification_tiny_cpu.yaml",
        [f"training.output_dir={tmp_path}", "training.max_steps=8"],
    )
    trainer, metrics = out["trainer"], out["metrics"]
    assert {"eval_accuracy", "eval_f1"} <= set(metrics) and "eval_perplexity" not in metrics
    pred = trainer.predict(trainer.eval_dataset)
    labels, guess = pred.label_ids, pred.predictions.argmax(-1)
    assert len(labels) == 64
    assert metrics["eval_accuracy"] == pytest.approx((guess == labels).mean())
    assert metrics["eval_f1"] == pytest.approx(f1_score(labels, guess))
    assert trainer.model.config.id2label == {0: "0", 1: "1"}


def test_supervised_recipe_errors(tmp_path, shared_data):
    recipe = recipes.load_training_recipe(REPO_ROOT / "recipes" / "translation_tiny_cpu.yaml")
    recipe["training"]["output_dir"] = str(tmp_path)
    with pytest.raises(ValueError, match="task='summarise': unknown task"):
        recipes.run({**recipe, "task": "summarise"})
    with pytest.raises(ValueError, match="needs a transformers tokenizer"):
        recipes.run({**recipe, "tokenizer": "bytes"})
    bad = {**recipe, "data": {**recipe["data"], "eval": "shared:translation/multi30k/val.de"}}
    with pytest.raises(
        ValueError, match=r"data.eval='shared:translation/multi30k/val.de': expected a mapping"
    ):
        recipes.run(bad)
    with pytest.raises(
        ValueError,
        match=r"metrics: task causal_lm takes none \(they apply to task: translation or classification\)",
    ):
        recipes.run({**TINY, "metrics": ["sacrebleu"]})


def test_accelerate_fsdp2_config_file_serves_accelerate_and_the_trainer(tmp_path):
    # recipes/accelerate/fsdp2.yaml: accelerate's own loader reads it as an FSDP2 launch config, and
    # training.fsdp_config=<that file> gives TrainingArguments the same FSDP2 plugin settings.
    from accelerate.commands.config.config_args import load_config_from_file
    from transformers import TrainingArguments

    path = str(REPO_ROOT / "recipes/accelerate/fsdp2.yaml")
    launch = load_config_from_file(path)
    assert launch.distributed_type == "FSDP" and launch.fsdp_config["fsdp_version"] == 2
    training = {"output_dir": str(tmp_path), "use_cpu": True, "report_to": [], "fsdp_config": path}
    runner.fsdp_config_from_accelerate_file(training)
    args = TrainingArguments(**training)
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert args.fsdp_plugin_args["state_dict_type"] == "SHARDED_STATE_DICT"
    not_accelerate = tmp_path / "plain.yaml"
    not_accelerate.write_text("fsdp_version: 2\n")
    with pytest.raises(ValueError, match="holds no fsdp_config section"):
        runner.fsdp_config_from_accelerate_file({"fsdp_config": str(not_accelerate)})


# ------------------------------------------------------------------ recipe checks up front (issue 22)
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("method.sst.rank=16", r"^method\.sst\.rank: unknown key; did you mean method\.sst\.r\? "),
        ("training.max_step=5", r"^training\.max_step: unknown key; did you mean training\.max_steps\? "),
        (
            "training.max_steps=1.5",
            r"^training\.max_steps=1\.5: expected an integer, e.g\. training\.max_steps=2$",
        ),
        ("training.bf16=maybe", r"^training\.bf16='maybe': expected true or false$"),
        (
            "training.lr_scheduler_type=cosin",
            r"^training\.lr_scheduler_type='cosin': .*did you mean .*=cosine\?$",
        ),
        (
            "method.chtss.final_densty=0.3",
            r"^method\.chtss\.final_densty: unknown key; did you mean .*final_density\?",
        ),
        ("method.sst.mode=fine-tune", r"^method\.sst\.mode='fine-tune': expected one of pretrain, finetune"),
        (
            "method.name=chtss method.chtss.final_density=0.9",
            r"^method\.chtss: final_density=0\.9 > initial_density",
        ),
        (
            "model.config.hiden_size=8",
            r"^model\.config\.hiden_size: unknown key; did you mean .*hidden_size\?",
        ),
    ],
)
def test_each_wrong_set_exits_2_with_one_line_naming_the_key(setting, message, capsys):
    recipe = str(REPO_ROOT / "recipes" / "sst_tiny_cpu.yaml")
    assert cli.main([recipe, "--set", *setting.split()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leanformers-train: error: "), err
    assert re.search(message, err[0].removeprefix("leanformers-train: error: ")), err[0]


def test_a_wrong_set_from_the_console_script_has_no_traceback(tmp_path):
    proc = run_command(
        [
            sys.executable,
            "-m",
            "leanformers.train",
            "recipes/sst_tiny_cpu.yaml",
            "--set",
            "training.max_steps=1.5",
        ]
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "leanformers-train: error: training.max_steps=1.5: expected an integer, e.g. training.max_steps=2"
    )


def test_switching_method_name_keeps_the_rank_and_targets_and_says_what_changed(recipe, tmp_path, caplog):
    """method.name=lora on an SST recipe: LoRA at the SST section's r and targets, not LoRA's defaults."""
    recipe["method"] = {
        "name": "lora",
        "sst": {"r": 4, "target_modules": ["q_proj", "v_proj"], "steps_per_iteration": 2, "mode": "pretrain"},
    }
    with caplog.at_level(logging.WARNING, logger="leanformers"):
        out = recipes.run(recipe)
    config = out["model"].peft_config["default"]
    assert config.r == 4 and set(config.target_modules) == {"q_proj", "v_proj"}
    assert out["metrics"]["trainable_parameters"] == 4 * (32 + 32) + 4 * (32 + 16)  # q (32x32), v (16x32)
    (note,) = out["metrics"]["method_notes"]
    assert "method.lora.r=4 carried from method.sst" in note and "target_modules=['q_proj', 'v_proj']" in note
    assert "method.sst options not used by lora: mode='pretrain', steps_per_iteration=2" in note
    assert note in caplog.text
    # sections of the same family that disagree: the recipe must say which rank the new method takes
    recipe["method"] = {"name": "sst", "lora": {"r": 4}, "frozen": {"r": 2}}
    METHODS["frozen"] = METHODS["lora"]
    try:
        with pytest.raises(ValueError, match=r"method.lora.r=4, method.frozen.r=2; set method.sst.r"):
            recipes.run(recipe)
    finally:
        del METHODS["frozen"]


def test_help_lists_sections_keys_and_methods(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for section in ("model", "tokenizer", "data", "method", "training", "task", "metrics"):
        assert f"\n  {section} " in shown, section
    assert "block_size" in shown and "max_source_length" in shown and "TrainingArguments fields" in shown
    for name in ("dense", "lora", "sst", "chtss", "rigl", "static", "cht_official"):
        assert name in shown
    assert cli.main(["--keys", "method.sst"]) == 0
    assert re.search(r"^r +<class 'int'>", capsys.readouterr().out, re.M)
    assert cli.main(["--keys", "training"]) == 0 and "max_steps" in capsys.readouterr().out


def test_old_train_names_still_resolve_and_warn():
    import leanformers.train as old

    with pytest.warns(FutureWarning, match=r"leanformers.train.run moved to leanformers.recipes.runner.run"):
        assert old.run is recipes.run
    with pytest.warns(FutureWarning, match="leanformers.recipes.schema.load_training_recipe"):
        assert old.load_recipe is recipes.load_training_recipe
    with pytest.warns(FutureWarning, match="leanformers.recipes.methods.METHODS"):
        assert old.METHODS is METHODS
    with pytest.warns(FutureWarning, match="build_model moved"):
        model = old.build_model(TINY["model"], vocab_size=256)
    assert model.config.vocab_size == 256 and old.main is cli.main
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        old.nothing  # noqa: B018
