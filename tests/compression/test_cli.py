"""mpifa-compress end to end on a tiny LLaMA with the real SmolLM2 tokenizer, and its errors."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from leanformers.compression.cli import main
from tests.helpers import mpifa_cli_args, run_python

pytestmark = pytest.mark.slow


def _args(src, out, shared_data, *extra):
    return mpifa_cli_args(src, out, shared_data, *extra)


def test_cli_writes_a_reloadable_safetensors_folder(tiny_lm_folder, shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    rc = main(
        _args(
            tiny_lm_folder,
            out,
            shared_data,
            "--density",
            "0.5",
            "--eval",
            str(shared_data / "wikitext-2-raw-test.txt"),
            "--eval-seqlen",
            "128",
            "--eval-tokens",
            "1024",
            "--report",
            str(report),
        )
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "achieved density (targeted)" in printed and "ppl after" in printed
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names and "README.md" in names and any(n.endswith(".safetensors") for n in names)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mpifa"
    assert len(qc["modules"]) == 2 * 7 and all(spec["rank"] >= 1 for spec in qc["modules"].values())
    data = json.loads(report.read_text())
    assert data["report"]["achieved_density"] <= 0.5

    # The folder on disk is the model that was evaluated: a fresh process reproduces its perplexity.
    script = textwrap.dedent(f"""
        import json, leanformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from leanformers.data import load_text, tokenize_text
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        ids = tokenize_text(load_text({str(shared_data / "wikitext-2-raw-test.txt")!r}), tok)
        res = leanformers.perplexity(model, text=ids, seqlen=128, max_tokens=1024, progress=False)
        print(json.dumps({{"ppl": res.ppl, "cls": type(model.model.layers[0].mlp.down_proj).__name__}}))
    """)
    proc = run_python(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["cls"] == "PIFALinear"
    assert fresh["ppl"] == pytest.approx(data["perplexity"]["after"]["ppl"], rel=1e-5)


def test_cli_stream_writes_the_in_memory_folder_and_reports_peak_memory(
    tiny_lm_folder, shared_data, tmp_path, capsys
):
    from safetensors.torch import load_file

    assert main(_args(tiny_lm_folder, tmp_path / "mem", shared_data)) == 0
    capsys.readouterr()
    streamed = tmp_path / "stream"
    assert main(_args(tiny_lm_folder, streamed, shared_data, "--stream", "--offload", "disk")) == 0
    printed = capsys.readouterr().out
    assert "streaming (offload disk)" in printed and "peak host memory (RSS)" in printed

    def tensors(folder):
        return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}

    a, b = tensors(tmp_path / "mem"), tensors(streamed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "mem" / "config.json").read_text()) == json.loads(
        (streamed / "config.json").read_text()
    )
    assert (streamed / "README.md").is_file() and (streamed / "tokenizer.json").is_file()

    # what streaming cannot do is refused before any work, naming the alternative
    eval_file = str(shared_data / "wikitext-2-raw-test.txt")
    args = _args(tiny_lm_folder, tmp_path / "o", shared_data, "--stream", "--eval", eval_file)
    assert main(args) == 1
    assert "--stream compresses from a safetensors folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_yaml_config_and_flag_override(tiny_lm_folder, shared_data, tmp_path):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("density: 0.3\nsteps: 0\nlowrank: true\n")
    out, report = tmp_path / "o", tmp_path / "r.json"
    assert main(_args(tiny_lm_folder, out, shared_data, "--config", str(cfg), "--report", str(report))) == 0
    data = json.loads(report.read_text())
    assert data["config"]["density"] == 0.3 and data["config"]["output"] == "lowrank"
    assert data["report"]["achieved_density"] <= 0.3
    out2, report2 = tmp_path / "o2", tmp_path / "r2.json"
    assert (
        main(
            _args(
                tiny_lm_folder,
                out2,
                shared_data,
                "--config",
                str(cfg),
                "--density",
                "0.6",
                "--report",
                str(report2),
            )
        )
        == 0
    )
    assert json.loads(report2.read_text())["config"]["density"] == 0.6


def test_bad_inputs(tiny_lm_folder, shared_data, tmp_path, capsys):
    out = tmp_path / "o"
    # density is checked before anything is loaded (the source does not even exist here)
    assert main(["./no/such/model", "--output", str(out), "--density", "1.5"]) == 1
    assert "density must lie in (0, 1], got 1.5" in capsys.readouterr().err
    assert main(["./no/such/model", "--output", str(out), "--density", "0"]) == 1
    assert "density must lie in (0, 1], got 0" in capsys.readouterr().err

    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(_args(tiny_lm_folder, out, shared_data)) == 1
    assert "exists and is not empty: pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"

    assert main(["nobody-xyz/no-such-model-123", "--output", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert "could not load model 'nobody-xyz/no-such-model-123'" in err and "HF_HUB_OFFLINE" in err

    short = tmp_path / "short.txt"
    short.write_text("only a handful of calibration words\n")
    assert (
        main(
            [
                str(tiny_lm_folder),
                "--output",
                str(tmp_path / "o3"),
                "--calib",
                str(short),
                "--nsamples",
                "4",
                "--seqlen",
                "64",
            ]
        )
        == 1
    )
    assert "too few calibration tokens" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()

    # a calibration mix is checked before the model is loaded (the model does not exist here)
    bad_mix = ["./no/such/model", "--output", str(tmp_path / "o4"), "--calib"]
    assert main([*bad_mix, f"{tmp_path / 'missing.txt'}=2,python:json"]) == 1
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert main([*bad_mix, "python:json=heavy"]) == 1
    assert "is not a number" in capsys.readouterr().err
    assert main([*bad_mix, "python:surely_not_a_module_xyz=1,python:json=1"]) == 1
    assert "no installed module of that name" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main([str(tiny_lm_folder)])  # --output missing: argparse usage error
    assert "--output is required" in capsys.readouterr().err


# Every flag the CLI had before its compression flags were generated from MPIFAConfig.
LEGACY_FLAGS = [
    "output",
    "density",
    "attn-density",
    "owl",
    "calib",
    "nsamples",
    "seqlen",
    "alpha",
    "steps",
    "init",
    "lowrank",
    "rank-multiple",
    "blocks-path",
    "groups",
    "batch-size",
    "dtype",
    "device",
    "seed",
    "gguf-file",
    "eval",
    "eval-seqlen",
    "eval-tokens",
    "tasks",
    "tasks-limit",
    "push-to-hub",
    "private",
    "overwrite",
    "report",
]


def test_flags_come_from_mpifa_config_with_its_defaults_and_docs():
    import dataclasses

    from leanformers import MPIFAConfig
    from leanformers.compression.options import build_configs, build_parser, resolve_options

    def build_config(opts):
        (config,) = build_configs(opts)
        return config

    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {f"--{name}" for name in LEGACY_FLAGS} <= flags
    helps = {a.dest: a.help for a in parser._actions}
    for f in dataclasses.fields(MPIFAConfig):
        if f.name not in ("output", "targets", "attention", "offload_streams"):
            assert f"--{f.name.replace('_', '-')}" in flags, f.name
            assert helps[f.name] and len(helps[f.name]) > 15, f.name  # the field's docstring entry
    # no flag given: the config is MPIFAConfig's own defaults (defaults live in one place)
    assert build_config(resolve_options(["src", "--output", "o"])) == MPIFAConfig()
    opts = resolve_options(
        [
            "src",
            "--output",
            "o",
            "--lowrank",
            "--no-scatter-free-mlp",
            "--groups",
            "a,b;c",
            "--owl-lambda",
            "0.1",
        ]
    )
    assert build_config(opts) == MPIFAConfig(
        output="lowrank", scatter_free_mlp=False, groups=[["a", "b"], ["c"]], owl_lambda=0.1
    )


def test_owl_flag_is_auto_by_default_and_turns_off_with_no_owl():
    from leanformers.compression.options import build_configs, build_parser, resolve_options

    def owl(*flags):
        (config,) = build_configs(resolve_options(["src", "--output", "o", *flags]))
        return config.owl

    assert owl() is True  # auto: MPIFA's M reads the calibration data anyway
    assert owl("--no-owl") is False
    assert owl("--attn-density", "0.6") is False  # auto yields to an explicit attention split
    assert owl("--init", "svd", "--steps", "0") is False  # plain SVD stays calibration-free
    with pytest.raises(ValueError, match="choose either owl or attn_density"):
        owl("--owl", "--attn-density", "0.6")
    help_text = build_parser().format_help()
    assert "--owl, --no-owl" in help_text and "(default: auto" in help_text


def test_unknown_config_key_names_the_valid_ones(tmp_path, capsys):
    from leanformers.compression.options import resolve_options

    cfg = tmp_path / "c.yaml"
    cfg.write_text("density: 0.3\ndensty: 0.4\n")
    with pytest.raises(SystemExit):
        resolve_options(["src", "--output", "o", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert "unknown keys in" in err and "['densty']" in err and "density" in err.split("use", 1)[1]


def test_default_calibration_is_self_text_and_leanformers_source_and_works_offline(
    tiny_lm_folder, tmp_path, monkeypatch
):
    """The default --calib (issue 20): the model's own text x3 + leanformers' source x1 — no dataset, no
    other package's files; with no --calib and no network the command compresses and says what it used."""
    import socket

    from leanformers.compression.options import DEFAULT_CALIBRATION, build_parser
    from leanformers.data import parse_sources

    assert parse_sources(DEFAULT_CALIBRATION) == [("self", 3.0), ("python:leanformers", 1.0)]
    assert "self=3,python:leanformers=1" in build_parser().format_help().replace("\n", "").replace(" ", "")
    monkeypatch.setenv("LEANFORMERS_CACHE", str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    report = tmp_path / "r.json"
    args = [str(tiny_lm_folder), "--output", str(tmp_path / "o"), "--nsamples", "4", "--seqlen", "64"]
    assert main([*args, "--device", "cpu", "--report", str(report)]) == 0
    summary = json.loads(report.read_text())
    assert summary["summary"]["calibration"].startswith(
        "mix of self x3, python:leanformers x1: 4 x 64 tokens"
    )


def test_a_truncated_source_shard_is_named_not_a_traceback(tiny_lm_folder, shared_data, tmp_path, capsys):
    """Issue 19 #13: a dense source whose shard was cut short (in memory and --stream)."""
    import shutil

    source = tmp_path / "src"
    shutil.copytree(tiny_lm_folder, source)
    shard = source / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    for extra in ([], ["--stream"]):
        assert main(_args(source, tmp_path / f"o{len(extra)}", shared_data, *extra)) == 1
        err = capsys.readouterr().err
        assert "model.safetensors is truncated" in err and "Traceback" not in err, err
