"""``leanformers-train RECIPE.yaml``: one training entry point on HF Trainer + accelerate.

Runs in one process (``leanformers-train r.yaml``) or several (``accelerate launch --num_processes 2
[--cpu] -m leanformers.train r.yaml``, ``torchrun --nproc_per_node 2 -m leanformers.train r.yaml``).

A recipe (YAML) has five sections::

    model:     {config: {model_type: llama, hidden_size: 64, ...}}   # from config (random init)
               # or {pretrained: path-or-hub-id, dtype: float32}
    tokenizer: bytes | smollm2 | path-or-hub-id                      # bytes: UTF-8 bytes, vocab 256
               # or {bpe: {files: [...], vocab_size: 4000}}: a BPE trained on the files (cached)
    data:      {train: file/folder/datasets-name, eval: ..., block_size: 256,
                eval_fraction: 0.05, max_train_tokens: null, text_field: text}
    method:    {name: sst, sst: {r: 64, ...}}                         # dense | lora | sst | ...
    training:  {output_dir: out/, max_steps: 1000, ...}               # transformers.TrainingArguments

Two optional sections make it a supervised recipe with ``evaluate`` metrics in ``trainer.evaluate()``
(``compute_metrics``; metric modules load offline, see :mod:`leanformers.eval.metrics`)::

    task:      causal_lm (default) | translation | classification
    metrics:   [sacrebleu, chrf]   (translation default; reported as eval_bleu, eval_chrf)
               [accuracy, f1]      (classification default; eval_accuracy, eval_f1)

``translation`` builds an encoder-decoder from ``model.config`` (e.g. marian, bart) and trains it with
Seq2SeqTrainer and ``predict_with_generate``; ``data.train`` / ``data.eval`` are
``{source: file, target: file}`` of aligned lines. ``classification`` builds a sequence classifier
(``num_labels`` in the config) on a TSV/CSV/JSONL file with ``text_field`` / ``label_field``.
See recipes/translation_tiny_cpu.yaml and recipes/classification_tiny_cpu.yaml.

``--set key.sub=value`` overrides any entry (values parsed as YAML), e.g.
``--set training.max_steps=10 method.sst.r=8``.

:data:`METHODS` holds dense, lora, sst and every preset of :data:`leanformers.chts.config.METHOD_PRESETS`
(chtss, chts, cht, set, rigl, static and the official ones). Adding a training method is one entry::

    def _mine(model, options):        # options = recipe["method"].get("mine", {})
        return model, [MyCallback(**options)]
    METHODS["mine"] = _mine

A method builder takes the model and its options dict and returns (model to train, Trainer callbacks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from leanformers import recipes
from leanformers.chts.config import METHOD_PRESETS
from leanformers.training.fsdp import save_full_model

__all__ = ["METHODS", "build_dataset", "build_model", "load_recipe", "load_source", "main", "run"]

MethodBuilder = Callable[[torch.nn.Module, dict], tuple[torch.nn.Module, list[TrainerCallback]]]


# ------------------------------------------------------------------------------------------ methods
def _dense(model: torch.nn.Module, options: dict) -> tuple[torch.nn.Module, list[TrainerCallback]]:
    if options:
        raise ValueError(f"method 'dense' takes no options, got {sorted(options)}")
    return model, []


def _set_trainable_in_place(model: torch.nn.Module, names: list[str]) -> None:
    """Make parameters of modules whose name ends with one of ``names`` trainable (no copies)."""
    found = set()
    for module_name, module in model.named_modules():
        for wanted in names:
            if module_name == wanted or module_name.endswith("." + wanted):
                found.add(wanted)
                for p in module.parameters(recurse=True):
                    if p.is_floating_point():
                        p.requires_grad_(True)
    missing = sorted(set(names) - found)
    if missing:
        raise ValueError(f"train_modules {missing} match no module of the model")


def _lora(model: torch.nn.Module, options: dict) -> tuple[torch.nn.Module, list[TrainerCallback]]:
    """PEFT LoRA. ``train_modules`` (e.g. [embed_tokens, lm_head, norm]) train in place, as in the SST
    paper's LoRA baseline for pretraining; note that LoRA's save_pretrained does not store them."""
    from peft import LoraConfig, get_peft_model

    options = dict(options)
    train_modules = options.pop("train_modules", None)
    options.setdefault("target_modules", "all-linear")
    model = get_peft_model(model, LoraConfig(**options))
    if train_modules:
        _set_trainable_in_place(model, list(train_modules))
    return model, []


def _sst(model: torch.nn.Module, options: dict) -> tuple[torch.nn.Module, list[TrainerCallback]]:
    from peft import get_peft_model

    from leanformers.sst import SSTCallback, SSTConfig

    return get_peft_model(model, SSTConfig(**options)), [SSTCallback()]


METHODS: dict[str, MethodBuilder] = {"dense": _dense, "lora": _lora, "sst": _sst}

# recipe task -> transformers Auto class of its model
TASKS: dict[str, str] = {
    "causal_lm": "AutoModelForCausalLM",
    "translation": "AutoModelForSeq2SeqLM",
    "classification": "AutoModelForSequenceClassification",
}


def _sparse_method(name: str) -> MethodBuilder:
    """A CHTss preset (chtss, chts, set, rigl, ...): options are CHTssConfig fields on top of the preset."""

    def build(model: torch.nn.Module, options: dict) -> tuple[torch.nn.Module, list[TrainerCallback]]:
        from leanformers.chts import CHTssCallback, CHTssConfig

        return model, [CHTssCallback(CHTssConfig.for_method(name, **options))]

    return build


# every preset of CHTssConfig (incl. the official ones) is a method; the table lives once, in chts/config.py
METHODS.update({name: _sparse_method(name) for name in METHOD_PRESETS})


# ------------------------------------------------------------------------------------------ recipe
def _fsdp_config_from_accelerate_file(training: dict) -> None:
    """``training.fsdp_config: recipes/accelerate/fsdp2.yaml``: the Trainer reads the ``fsdp_config`` of
    an accelerate config file (the one ``accelerate launch --config_file`` takes), so that one file
    configures both ways of launching; ``training.fsdp`` defaults to True then. In place."""
    path = training.get("fsdp_config")
    if not isinstance(path, str) or not path.endswith((".yaml", ".yml")):
        return  # a dict, or a JSON file TrainingArguments reads itself
    import yaml

    with open(path, encoding="utf-8") as f:
        content = yaml.safe_load(f) or {}
    if not isinstance(content.get("fsdp_config"), dict):
        raise ValueError(
            f"training.fsdp_config={path} holds no fsdp_config section (an accelerate config file)"
        )
    training["fsdp_config"] = dict(content["fsdp_config"])
    training.setdefault("fsdp", True)


SECTIONS = ("model", "tokenizer", "data", "method", "training", "task", "metrics")


def load_recipe(path: str | os.PathLike | dict, overrides: list[str] | None = None) -> dict:
    """Read a recipe (YAML path or dict) and apply ``key.sub=value`` overrides (see :mod:`leanformers.recipes`)."""
    recipe = recipes.load_recipe(path, overrides, sections=SECTIONS, required=("model", "data", "training"))
    if recipe.get("task", "causal_lm") not in TASKS:
        raise ValueError(f"unknown task {recipe['task']!r}; known: {', '.join(TASKS)}")
    return recipe


# ------------------------------------------------------------------------------------------ model / data
class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256): a dependency-free tokenizer for tiny CPU recipes."""

    vocab_size = 256

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = False):
        return {"input_ids": list(text.encode("utf-8"))}

    def save_pretrained(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "byte_tokenizer.json").write_text(
            json.dumps({"type": "utf-8 bytes", "vocab_size": 256})
        )


def build_tokenizer(spec: str | dict | None):
    """``bytes`` (default), ``smollm2``, a path or Hub id, or ``{bpe: {files: [...], vocab_size: N,
    min_frequency: 2}, cache_dir: null}``: a byte-level BPE trained on the files with ``tokenizers``
    (cached by content, see :func:`leanformers.data.tokenizer.bpe_tokenizer`)."""
    if isinstance(spec, dict):
        from leanformers.data.tokenizer import bpe_tokenizer

        recipes.check_keys(spec, ("bpe", "cache_dir"), "tokenizer keys")
        options = dict(spec.get("bpe") or {})
        recipes.check_keys(options, ("files", "vocab_size", "min_frequency"), "tokenizer.bpe keys")
        if not options.get("files"):
            raise ValueError(
                "tokenizer.bpe needs files: [training text files], e.g. both sides of the train split"
            )
        files = [_source_path(f) for f in options.pop("files")]
        return bpe_tokenizer(files, cache_dir=spec.get("cache_dir"), **options)
    if spec is None or spec == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    if spec == "smollm2":
        from leanformers.hub import smollm2_135m

        spec = str(smollm2_135m())
    return AutoTokenizer.from_pretrained(spec)


def build_model(
    spec: dict, vocab_size: int | None = None, task: str = "causal_lm", defaults: dict | None = None
) -> torch.nn.Module:
    """A model from ``{config: {...}}`` (random init, ``seed`` optional) or ``{pretrained: ...}``.

    ``task`` picks the Auto class (causal LM, seq2seq LM, sequence classification); ``defaults``
    fill config entries the recipe leaves out (e.g. the tokenizer's pad id).
    """
    import transformers
    from transformers import AutoConfig

    auto = getattr(transformers, TASKS[task])
    dtype = getattr(torch, spec.get("dtype", "float32"))
    if "pretrained" in spec:
        return auto.from_pretrained(spec["pretrained"], dtype=dtype)
    if "config" not in spec:
        raise ValueError("model: give either 'config: {model_type: ..., ...}' or 'pretrained: path-or-id'")
    cfg = dict(spec["config"])
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError("model.config needs a model_type (e.g. llama)")
    if vocab_size is not None:
        cfg.setdefault("vocab_size", vocab_size)
    for key, value in (defaults or {}).items():
        if value is not None:
            cfg.setdefault(key, value)
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(int(spec.get("seed", 0)))
    return auto.from_config(config, dtype=dtype)


class PackedBlocks(torch.utils.data.Dataset):
    """(n, block_size) token blocks as causal-LM examples (labels = input_ids)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def _pack(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    n = ids.numel() // block_size
    if n == 0:
        raise ValueError(f"the data has {ids.numel()} tokens, fewer than one block of {block_size}")
    return ids[: n * block_size].view(n, block_size)


def _stdlib_text(split: str) -> str:
    """Python standard-library source as a corpus: 1 file in 20 (by a hash of its path) is ``eval``."""
    import hashlib
    import sysconfig

    if split not in ("train", "eval"):
        raise ValueError(f"stdlib source split must be 'train' or 'eval', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    chosen = []
    for path in files:
        held_out = int(hashlib.sha256(str(path.relative_to(root)).encode()).hexdigest(), 16) % 20 == 0
        if held_out == (split == "eval"):
            chosen.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(chosen)


def load_source(source: str, text_field: str = "text") -> str:
    """Text of a data source: a file/folder/datasets name (see leanformers.data.load_text),
    ``shared:NAME`` (a file of ../shared/data) or ``stdlib:train`` / ``stdlib:eval`` (Python source)."""
    from leanformers.data import load_text, shared_data_path

    source = str(source)
    if source.startswith("shared:"):
        return load_text(shared_data_path(source.removeprefix("shared:")), text_field=text_field)
    if source.startswith("stdlib:"):
        return _stdlib_text(source.removeprefix("stdlib:"))
    return load_text(source, text_field=text_field)


def build_dataset(spec: dict, tokenizer) -> tuple[PackedBlocks, PackedBlocks | None]:
    """Tokenise and pack ``data.train`` (and ``data.eval`` or a held-out tail) into blocks."""
    from leanformers.data import tokenize_text

    if "train" not in spec:
        raise ValueError("data needs a 'train' source (a file, a folder or a datasets name)")
    block_size = int(spec.get("block_size", 256))
    text_field = spec.get("text_field", "text")
    ids = tokenize_text(load_source(spec["train"], text_field), tokenizer)
    if spec.get("max_train_tokens"):
        ids = ids[: int(spec["max_train_tokens"])]
    eval_ds = None
    if spec.get("eval"):
        eval_ids = tokenize_text(load_source(spec["eval"], text_field), tokenizer)
        if spec.get("max_eval_tokens"):
            eval_ids = eval_ids[: int(spec["max_eval_tokens"])]
        eval_ds = PackedBlocks(_pack(eval_ids, block_size))
    elif spec.get("eval_fraction"):
        cut = int(ids.numel() * (1 - float(spec["eval_fraction"])))
        ids, eval_ids = ids[:cut], ids[cut:]
        eval_ds = PackedBlocks(_pack(eval_ids, block_size))
    return PackedBlocks(_pack(ids, block_size)), eval_ds


# ------------------------------------------------------------------------------------------ supervised
def _source_path(source: str) -> Path:
    from leanformers.data import shared_data_path

    source = str(source)
    path = shared_data_path(source.removeprefix("shared:")) if source.startswith("shared:") else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    return path


def _lines(source: str) -> list[str]:
    """Lines of a text file (aligned corpora: one sentence a line, blank lines kept for alignment)."""
    return _source_path(source).read_text(encoding="utf-8").splitlines()


class Examples(torch.utils.data.Dataset):
    """Tokenised examples (dicts of id lists) for a padding data collator."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    # causal-LM tokenisers (e.g. SmolLM2's) add no EOS; a seq2seq model must learn to stop
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def build_translation_dataset(spec: dict, tokenizer) -> tuple[Examples, Examples, list[str]]:
    """``data.train`` / ``data.eval`` = ``{source: file, target: file}`` of aligned lines.

    Returns (train, eval, raw eval targets, the BLEU/chrF references).
    """
    max_src = int(spec.get("max_source_length", 128))
    max_tgt = int(spec.get("max_target_length", 128))
    eos = tokenizer.eos_token_id

    def split(name: str, limit_key: str) -> tuple[Examples, list[str]]:
        part = spec.get(name)
        if not isinstance(part, dict) or not {"source", "target"} <= set(part):
            raise ValueError(f"data.{name} of a translation recipe must be {{source: file, target: file}}")
        src, tgt = _lines(part["source"]), _lines(part["target"])
        if len(src) != len(tgt):
            raise ValueError(f"data.{name}: {len(src)} source lines but {len(tgt)} target lines")
        pairs = [(a.strip(), b.strip()) for a, b in zip(src, tgt) if a.strip() and b.strip()]
        if spec.get(limit_key):
            pairs = pairs[: int(spec[limit_key])]
        rows = []
        for a, b in pairs:
            ids = tokenizer(a, truncation=True, max_length=max_src - 1)["input_ids"]
            labels = tokenizer(text_target=b, truncation=True, max_length=max_tgt - 1)["input_ids"]
            rows.append({"input_ids": _with_eos(ids, eos), "labels": _with_eos(labels, eos)})
        return Examples(rows), [b for _, b in pairs]

    train, _ = split("train", "max_train_examples")
    evaluation, references = split("eval", "max_eval_examples")
    return train, evaluation, references


def _table_rows(path: Path) -> list[dict]:
    import csv

    if path.suffix in (".jsonl", ".json"):
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    delimiter = "\t" if path.suffix in (".tsv", ".tab") else ","
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE))


def build_classification_dataset(spec: dict, tokenizer) -> tuple[Examples, Examples, list]:
    """Rows of a TSV/CSV/JSONL file (``text_field``, ``label_field``) split into train / eval.

    ``data.eval`` names a separate file; otherwise ``eval_fraction`` of the rows, after a shuffle
    with ``seed``, is held out. Returns (train, eval, label names in id order).
    """
    import random

    text_field, label_field = spec.get("text_field", "text"), spec.get("label_field", "label")
    max_length = int(spec.get("max_length", 128))

    def read(source: str) -> list[dict]:
        rows = _table_rows(_source_path(source))
        for key in (text_field, label_field):
            if rows and key not in rows[0]:
                raise ValueError(f"{source} has no column {key!r} (columns: {sorted(rows[0])})")
        return rows

    if "train" not in spec:
        raise ValueError("data needs a 'train' file")
    train_rows = read(spec["train"])
    if spec.get("eval"):
        eval_rows = read(spec["eval"])
    else:
        fraction = float(spec.get("eval_fraction", 0.2))
        random.Random(int(spec.get("seed", 0))).shuffle(train_rows)
        cut = len(train_rows) - max(1, int(len(train_rows) * fraction))
        train_rows, eval_rows = train_rows[:cut], train_rows[cut:]
    if spec.get("max_train_examples"):
        train_rows = train_rows[: int(spec["max_train_examples"])]
    if spec.get("max_eval_examples"):
        eval_rows = eval_rows[: int(spec["max_eval_examples"])]
    labels = sorted({str(r[label_field]) for r in train_rows + eval_rows})
    index = {name: i for i, name in enumerate(labels)}

    def encode(rows: list[dict]) -> Examples:
        out = []
        for r in rows:
            enc = tokenizer(str(r[text_field]).strip(), truncation=True, max_length=max_length)
            out.append({"input_ids": enc["input_ids"], "labels": index[str(r[label_field])]})
        return Examples(out)

    return encode(train_rows), encode(eval_rows), labels


def _supervised(recipe: dict, tokenizer, task: str) -> dict:
    """Model, datasets, Trainer class, arguments and compute_metrics of a translation/classification recipe."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    from leanformers.eval.metrics import classification_metrics, translation_metrics

    if isinstance(tokenizer, ByteTokenizer):
        raise ValueError(
            f"a {task} recipe needs a transformers tokenizer (e.g. tokenizer: smollm2), not bytes"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    defaults = {"pad_token_id": tokenizer.pad_token_id}
    if task == "translation":
        from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

        train_ds, eval_ds, references = build_translation_dataset(recipe["data"], tokenizer)
        defaults.update(
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            forced_eos_token_id=tokenizer.eos_token_id,
        )
        model = build_model(recipe["model"], len(tokenizer), task, defaults)
        names = recipe.get("metrics") or ["sacrebleu", "chrf"]
        training = dict(recipe["training"])
        training.setdefault("predict_with_generate", True)
        training.setdefault("generation_max_length", int(recipe["data"].get("max_target_length", 128)))
        return {
            "model": model,
            "train": train_ds,
            "eval": eval_ds,
            "trainer_class": Seq2SeqTrainer,
            "args": Seq2SeqTrainingArguments,
            "training": training,
            "collator": DataCollatorForSeq2Seq(tokenizer, model=model),
            "compute_metrics": translation_metrics(tokenizer, references, names),
        }
    train_ds, eval_ds, labels = build_classification_dataset(recipe["data"], tokenizer)
    defaults.update(num_labels=len(labels))
    model = build_model(recipe["model"], len(tokenizer), task, defaults)
    if model.config.num_labels != len(labels):
        raise ValueError(
            f"model.config.num_labels is {model.config.num_labels} but the data have labels {labels}"
        )
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    return {
        "model": model,
        "train": train_ds,
        "eval": eval_ds,
        "trainer_class": Trainer,
        "args": TrainingArguments,
        "training": dict(recipe["training"]),
        "collator": DataCollatorWithPadding(tokenizer),
        "compute_metrics": classification_metrics(len(labels), recipe.get("metrics") or ["accuracy", "f1"]),
    }


# ------------------------------------------------------------------------------------------ run
def run(recipe: dict | str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Train as the recipe says; returns (and writes to ``output_dir/results.json``) the metrics."""
    recipe = load_recipe(recipe, overrides)
    method = dict(recipe.get("method") or {"name": "dense"})
    name = method.get("name", "dense")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    task = recipe.get("task", "causal_lm")
    tokenizer = build_tokenizer(recipe.get("tokenizer"))
    extra: dict[str, Any] = {}
    if task == "causal_lm":
        if recipe.get("metrics"):
            raise ValueError("metrics apply to task: translation or classification recipes")
        train_ds, eval_ds = build_dataset(recipe["data"], tokenizer)
        vocab = getattr(tokenizer, "vocab_size", None)
        if vocab is not None and hasattr(tokenizer, "__len__"):
            vocab = len(tokenizer)
        model = build_model(recipe["model"], vocab_size=vocab)
        trainer_class, args_class, training = Trainer, TrainingArguments, dict(recipe["training"])
    else:
        parts = _supervised(recipe, tokenizer, task)
        model, train_ds, eval_ds = parts["model"], parts["train"], parts["eval"]
        trainer_class, args_class, training = parts["trainer_class"], parts["args"], parts["training"]
        extra = {
            "data_collator": parts["collator"],
            "compute_metrics": parts["compute_metrics"],
            "processing_class": tokenizer,
        }
    n_params = sum(p.numel() for p in model.parameters())
    model, callbacks = METHODS[name](model, dict(method.get(name) or {}))
    training.setdefault("report_to", "none")
    training.setdefault("save_strategy", "no")
    _fsdp_config_from_accelerate_file(training)
    args = args_class(**training)
    trainer = trainer_class(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, callbacks=callbacks, **extra
    )
    result = trainer.train(resume_from_checkpoint=recipe.get("resume_from_checkpoint"))
    metrics = {"method": name, "world_size": args.world_size, "model_parameters": n_params, **result.metrics}
    metrics["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for callback in callbacks:  # a training-time method's whole-model summary (e.g. chtss/density_model)
        controller = getattr(callback, "controller", None)
        if controller is not None:
            metrics.update({k: v for k, v in controller.metrics().items() if k.count("/") == 1})
    if eval_ds is not None:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        if "eval_loss" in eval_metrics and task == "causal_lm":
            metrics["eval_perplexity"] = math.exp(eval_metrics["eval_loss"])
        # sacrebleu's signatures of eval_bleu / eval_chrf (translation), set by the last evaluation
        metrics.update(getattr(extra.get("compute_metrics"), "signatures", {}))
    out = Path(args.output_dir)
    save_full_model(trainer, out / "final")  # every rank: gathering a sharded (FSDP2) model is a collective
    if trainer.is_world_process_zero():
        if not isinstance(tokenizer, ByteTokenizer):
            # final/ then loads by itself (lm-eval / leanformers-eval, or a translation pipeline)
            tokenizer.save_pretrained(str(out / "final"))
        (out / "results.json").write_text(json.dumps(metrics, indent=2))
    return {"metrics": metrics, "trainer": trainer, "model": model}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leanformers-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    out = run(args.recipe, args.overrides)
    if out["trainer"].is_world_process_zero():
        print(json.dumps(out["metrics"], indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
