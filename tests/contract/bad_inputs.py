"""Bad-input operations of the contract table (issue 19): what a user hands leanformers by mistake or
receives from someone else. Every one of them must be refused with a clear error that names the module or
the field (the rows declare the exception type and a message fragment in table.py's QUIRKS); none may load
or run silently, and none may surface as a bare traceback of a library underneath.

Tampering is done on a real saved checkpoint (safetensors / config.json edited as a careless tool would).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.contract.table import Row

TARGET = "model.layers.0.mlp.down_proj"  # a column-form PIFA layer (it gathers its input)


def _saved(row: Row, tmp_path: Path) -> Path:
    """A compressed tiny model of ``row`` saved with save_compressed."""
    from leanformers import save_compressed
    from tests.contract.checks import wrap

    model, _ = wrap(row)
    return save_compressed(model, None, tmp_path / "saved")


def _load(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    import leanformers  # noqa: F401  (the quantizer)

    AutoModelForCausalLM.from_pretrained(folder)


def _edit_tensors(folder: Path, edit) -> None:
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _index_key(tensors: dict) -> str:
    keys = [k for k in tensors if k.startswith(TARGET + ".") and k.endswith("_index")]
    assert keys, f"{TARGET} stores no gather index"
    return keys[0]


def check_load_duplicate_index(row: Row, tmp_path: Path) -> None:
    """A gather index with one entry repeated (a permutation no more)."""
    folder = _saved(row, tmp_path)

    def edit(t):
        key = _index_key(t)
        t[key] = t[key].clone()
        t[key][1] = t[key][0]

    _edit_tensors(folder, edit)
    _load(folder)


def check_load_index_out_of_range(row: Row, tmp_path: Path) -> None:
    folder = _saved(row, tmp_path)

    def edit(t):
        key = _index_key(t)
        t[key] = t[key].clone()
        t[key][3] = t[key].numel() + 7

    _edit_tensors(folder, edit)
    _load(folder)


def check_load_missing_index(row: Row, tmp_path: Path) -> None:
    folder = _saved(row, tmp_path)
    _edit_tensors(folder, lambda t: t.pop(_index_key(t)))
    _load(folder)


def check_load_string_spec(row: Row, tmp_path: Path) -> None:
    """A spec field written as a string ("false" would become True through bool())."""
    folder = _saved(row, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["modules"][TARGET]["input_permuted"] = "false"
    (folder / "config.json").write_text(json.dumps(config))
    _load(folder)


def check_load_truncated_shard(row: Row, tmp_path: Path) -> None:
    """A shard cut short (an interrupted download or copy)."""
    folder = _saved(row, tmp_path)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    _load(folder)


def check_yaml_wrong_type(row: Row, tmp_path: Path) -> None:
    """--config YAML whose value has the wrong type: overwrite: "false" is a string, not a boolean."""
    from leanformers.compression.options import load_config_file

    path = tmp_path / "c.yaml"
    path.write_text('density: 0.5\noverwrite: "false"\n')
    load_config_file(path)


def _compress_command(tmp_path: Path, *flags: str) -> None:
    """The command line's own checks, up to where the model would load (none of these gets that far)."""
    from leanformers.compression.cli import run
    from leanformers.compression.options import resolve_options

    run(resolve_options([str(tmp_path / "model"), "--output", str(tmp_path / "out"), *flags]))


def check_heal_lr_without_healing(row: Row, tmp_path: Path) -> None:
    """--heal-lr with no --heal-tokens: a learning rate for a healing that would not run (issue 20)."""
    _compress_command(tmp_path, "--heal-lr", "3e-5")


def check_negative_heal_lr(row: Row, tmp_path: Path) -> None:
    _compress_command(tmp_path, "--heal-tokens", "64", "--heal-lr=-3e-5")


def check_too_many_self_segments(row: Row, tmp_path: Path) -> None:
    """Self-calibration asked to cut a window into segments shorter than 2 tokens: refused by name."""
    from leanformers.compression.self_calibration import SelfCalibrationSettings, generate_self_calibration
    from tests.tiny_models import tiny_llama

    settings = SelfCalibrationSettings(segments=17)
    generate_self_calibration(tiny_llama(), None, 1, 32, settings=settings, progress=False)


def check_empty_distill_dataset(row: Row, tmp_path: Path) -> None:
    """A distillation (healing) run handed no training windows (issue 20): refused before any step."""
    import datasets
    from transformers import TrainingArguments

    from leanformers.compressors.healing import DistillationTrainer
    from tests.tiny_models import tiny_llama

    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=1)
    empty = datasets.Dataset.from_dict({"input_ids": []})
    DistillationTrainer(model=tiny_llama(), args=args, train_dataset=empty, teacher=tiny_llama()).train()


def check_tasks_data_dir_without_tasks(row: Row, tmp_path: Path) -> None:
    """--tasks-data-dir with no --tasks: a zero-shot data folder nothing would read."""
    _compress_command(tmp_path, "--tasks-data-dir", str(tmp_path))


def check_nan_setting(row: Row, tmp_path: Path) -> None:
    from leanformers import MPIFAConfig

    MPIFAConfig(damping=math.nan)


def check_negative_setting(row: Row, tmp_path: Path) -> None:
    from leanformers import MPIFAConfig

    MPIFAConfig(damping=-1.0)


def check_non_utf8_calibration(row: Row, tmp_path: Path) -> None:
    from leanformers import load_text

    path = tmp_path / "calib.json"
    path.write_bytes('[{"text": "caf\xe9 au lait"}]'.encode("latin-1"))
    load_text(path)


def check_rank_deficient_weight(row: Row, tmp_path: Path) -> None:
    """A linear whose weight is zero (rank 0) compresses at its numerical rank and is reported as such,
    instead of stopping the run (issue 19 #13)."""
    from leanformers import compress
    from tests.contract.checks import compression_of

    model = row.family.build(seed=0)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    config, calib = compression_of(row)
    report = compress(model, None, config, calibration=calib, progress=False)
    o_proj = next(m for m in report.modules if m.name.endswith("0.self_attn.o_proj"))
    assert o_proj.rank == 1 and o_proj.note and "no higher numerical rank" in o_proj.note, o_proj
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib[:1]).logits).all()


def check_load_duplicate_sst_index(row: Row, tmp_path: Path) -> None:
    """An SST adapter whose active indices repeat one direction (issue 19 #2, "the same for SST")."""
    from peft import PeftModel

    from tests.contract.checks import wrap

    model, _ = wrap(row)
    model.save_pretrained(tmp_path / "adapter")
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = next(k for k in sorted(tensors) if k.endswith("sst_index"))
    tensors[key] = tensors[key].clone()
    tensors[key][1] = tensors[key][0]
    save_file(tensors, str(file), metadata={"format": "pt"})
    PeftModel.from_pretrained(row.family.build(seed=row.method.reload_seed), tmp_path / "adapter")


BAD_INPUT_CHECKS = {
    name[len("check_") :]: fn for name, fn in dict(globals()).items() if name.startswith("check_")
}
