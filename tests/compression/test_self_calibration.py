"""Self-calibration (issue 20): the model writes its own calibration windows — seeded, batched, cached by
content, offline, mixable with text sources, refused where it cannot work."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

from leanformers import MPIFAConfig, WandaConfig, compress
from leanformers.compression.calibration import calibration_windows_for, windows_sha256
from leanformers.compression.self_calibration import (
    NEUTRAL_TURNS,
    SelfCalibrationSettings,
    generate_self_calibration,
    model_sha256,
    prompting_for,
    self_calibration_windows,
)
from leanformers.compression.text_sampling import sample_top_p, temperature_at
from leanformers.data import calibration_windows, load_text, tokenize_text
from tests.tiny_models import llama_config, tiny_bart, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_qwen2


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder (set after the session fixtures, so that SmolLM2 stays in the real one)."""
    monkeypatch.setenv("LEANFORMERS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def chat(smollm2_path):
    """A tiny LLaMA with the real SmolLM2 tokenizer and its chat template."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(32, 64, 2, 2, kv_heads=1, vocab=len(tokenizer), max_positions=256))
    return model.eval(), tokenizer


def test_temperature_schedule_and_top_p_sampling_are_the_documented_maths():
    s = SelfCalibrationSettings(temperature_start=1.0, temperature_end=0.5, temperature_tokens=10)
    assert temperature_at(torch.tensor([0, 5, 10, 99]), *s.schedule()).tolist() == [1.0, 0.75, 0.5, 0.5]
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    one = torch.ones(1)
    # nucleus 0.8 keeps {0.5, 0.3} (renormalised to 0.625 / 0.375): u below 0.625 -> token 0, above -> 1
    picks = [int(sample_top_p(logits, one, 0.8, torch.tensor([u]))) for u in (0.0, 0.62, 0.63, 0.999)]
    assert picks == [0, 0, 1, 1]
    assert int(sample_top_p(logits, one, 1.0, torch.tensor([0.99]))) == 3  # top_p 1: the whole vocabulary
    wide = torch.randn(3, 5000)  # the short head path and the full sort agree
    u = torch.rand(3, dtype=torch.float64)
    assert torch.equal(
        sample_top_p(wide, torch.ones(3), 0.9, u, head=16), sample_top_p(wide, torch.ones(3), 0.9, u)
    )
    with pytest.raises(ValueError, match="top_p must lie in"):
        SelfCalibrationSettings(top_p=0.0)


def test_windows_are_deterministic_for_a_seed_differ_across_seeds_and_ignore_the_batching(chat):
    model, tok = chat
    a = generate_self_calibration(model, tok, 3, 48, seed=0, progress=False)
    assert a.shape == (3, 48) and a.dtype == torch.long
    assert torch.equal(a, generate_self_calibration(model, tok, 3, 48, seed=0, progress=False))
    b = generate_self_calibration(model, tok, 3, 48, seed=1, progress=False)
    assert not torch.equal(a, b)
    # window k draws from its own generator: the same text whatever shares its batch
    one_by_one = SelfCalibrationSettings(batch_size=1)
    assert torch.equal(
        a, generate_self_calibration(model, tok, 3, 48, seed=0, settings=one_by_one, progress=False)
    )
    # every window is a chat: the template of one of the neutral turns, then the model's answer
    firsts = prompting_for(model, tok).first
    for row in a.tolist():
        assert any(row[: len(f)] == list(f) for f in firsts)
    assert len({tuple(r[:40]) for r in a.tolist()}) > 1  # seeded turn order: windows open differently


def test_a_window_in_segments_concatenates_independent_chats_generated_side_by_side(chat):
    """segments=3: a window of 145 tokens is three chats of 49, 48 and 48 tokens, each from its own
    generator (the same text in a batch of one), the first one the whole window's first tokens."""
    model, tok = chat
    three = SelfCalibrationSettings(segments=3)
    a = generate_self_calibration(model, tok, 2, 145, seed=4, settings=three, progress=False)
    assert a.shape == (2, 145)
    assert torch.equal(
        a, generate_self_calibration(model, tok, 2, 145, seed=4, settings=three, progress=False)
    )
    alone = SelfCalibrationSettings(segments=3, batch_size=1)
    assert torch.equal(
        a, generate_self_calibration(model, tok, 2, 145, seed=4, settings=alone, progress=False)
    )
    whole = generate_self_calibration(model, tok, 2, 145, seed=4, progress=False)
    assert torch.equal(a[:, :49], whole[:, :49]) and not torch.equal(a, whole)
    firsts = prompting_for(model, tok).first
    for row in a.tolist():
        for start, end in ((0, 49), (49, 97), (97, 145)):  # every segment opens a chat
            assert any(row[start:end][: len(f)] == list(f)[: end - start] for f in firsts)
    _, label = self_calibration_windows(
        model, tok, 2, 145, seed=4, settings=three, cache=False, progress=False
    )
    assert label.endswith("2 x 145 tokens, seed 4, 3 segments per window")
    with pytest.raises(ValueError, match="use at most 72 segments"):
        generate_self_calibration(model, tok, 1, 145, settings=SelfCalibrationSettings(segments=73))
    with pytest.raises(ValueError, match="segments must be an integer >= 1"):
        SelfCalibrationSettings(segments=0)


def test_a_chat_continues_with_the_next_neutral_turn_after_each_end_of_turn(chat):
    """A model that nearly always ends its turn: every answer is followed by the next turn's template."""
    from transformers import LlamaForCausalLM

    base, tok = chat
    model = LlamaForCausalLM(base.config).eval()
    model.load_state_dict(base.state_dict())
    head = nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 30.0
    model.lm_head = head
    prompting = prompting_for(model, tok)
    row = generate_self_calibration(model, tok, 1, 200, progress=False)[0].tolist()
    first = next(f for f in prompting.first if row[: len(f)] == list(f))
    pos, turns = len(first), [first]
    while pos < len(row):
        assert row[pos] == tok.eos_token_id  # the sampled end of turn
        follow = next(
            f for f in prompting.follow if row[pos + 1 : pos + 1 + len(f)] == list(f)[: len(row) - pos - 1]
        )
        turns.append(follow)
        pos += 1 + len(follow)
    assert len(turns) >= 4
    text = tok.decode(row)
    assert text.count("<|im_start|>user\n") == len(turns) and any(t in text for t in NEUTRAL_TURNS[1:])


def test_base_models_start_from_bos_and_refusals_name_the_problem():
    model = tiny_llama()  # no tokenizer: the config's BOS / EOS ids
    w = generate_self_calibration(model, None, 2, 16, progress=False)
    assert (w[:, 0] == model.config.bos_token_id).all()
    with pytest.raises(ValueError, match="neither bos_token_id nor eos_token_id"):
        generate_self_calibration(tiny_qwen2(), None, 2, 16, progress=False)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate_self_calibration(tiny_gpt2(), None, 2, 16, progress=False)  # GPT-2's 50256 in a vocab of 128
    with pytest.raises(ValueError, match="not a causal language model"):
        generate_self_calibration(tiny_bert_cls(), None, 2, 16, progress=False)
    with pytest.raises(ValueError, match="encoder-decoder"):
        generate_self_calibration(tiny_bart(), None, 2, 16, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        generate_self_calibration(model, None, 1, 300, progress=False)


def test_the_cache_returns_the_same_windows_and_is_keyed_by_the_weights(chat, cache):
    model, tok = chat
    a, label = self_calibration_windows(model, tok, 2, 32, seed=3, progress=False)
    assert "generated" in label and "chat prompting" in label
    files = list((cache / "self-calibration").glob("*.safetensors"))
    assert len(files) == 1
    b, label = self_calibration_windows(model, tok, 2, 32, seed=3, progress=False)
    assert "cached" in label and torch.equal(a, b)
    # a corrupt cache entry is never served: the windows are generated again
    files[0].write_bytes(b"not a safetensors file")
    c, label = self_calibration_windows(model, tok, 2, 32, seed=3, progress=False)
    assert "generated" in label and torch.equal(a, c)
    # other weights, other key
    before = model_sha256(model)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    try:
        assert model_sha256(model) != before
        _, label = self_calibration_windows(model, tok, 2, 32, seed=3, progress=False)
        assert "generated" in label and len(list((cache / "self-calibration").glob("*.safetensors"))) == 2
    finally:
        with torch.no_grad():
            model.model.norm.weight.sub_(1.0)
    assert model_sha256(model) == before


def test_self_calibration_works_offline(chat, cache, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model, tok = chat
    windows, _ = self_calibration_windows(model, tok, 2, 24, progress=False)
    assert windows.shape == (2, 24)


def test_mixes_draw_each_share_like_text_mixes(chat, cache, shared_data):
    model, tok = chat
    wiki = shared_data / "wikitext-2-v1-valid.txt"
    config = MPIFAConfig(nsamples=3, seqlen=32, seed=5)
    windows, label = calibration_windows_for(f"self=2,{wiki}=1", tok, config, model=model, progress=False)
    assert label.startswith("mix of self x2, wikitext-2-v1-valid.txt x1: 3 x 32 tokens, seed 5")
    own, _ = self_calibration_windows(model, tok, 2, 32, seed=5, progress=False)  # source 0: seed + 0
    assert torch.equal(windows[:2], own)
    text = calibration_windows(tokenize_text(load_text(wiki), tok), 1, 32, seed=6)  # source 1: seed + 1
    assert torch.equal(windows[2:], text)


def test_compress_records_the_hash_of_the_self_windows_and_streaming_refuses(chat, cache, tmp_path):
    from leanformers import compress_pretrained

    model, tok = chat
    expected, _ = self_calibration_windows(model, tok, 2, 16, progress=False)
    twin = type(model)(model.config).eval()
    twin.load_state_dict(model.state_dict())
    report = compress(
        twin, tok, WandaConfig(nsamples=2, seqlen=16, device="cpu"), calibration="self", progress=False
    )
    assert report.calibration.startswith("self (chat prompting") and report.calibration_tokens == 32
    assert report.calibration_sha256 == windows_sha256(expected)
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="drop --stream"):
        compress_pretrained(
            tmp_path / "dense", tmp_path / "out", WandaConfig(nsamples=2, seqlen=16), "self", tok
        )
    assert not (tmp_path / "out").exists()


def test_cli_calib_self_in_memory_and_its_refusal_with_stream(tiny_lm_folder, cache, tmp_path, capsys):
    """``--calib self`` compresses offline with windows the model wrote (their hash in the report);
    ``--stream --calib self`` stops with the alternatives before writing anything."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanformers.compression.cli import main

    base = ["--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--method", "wanda-2:4"]
    report = tmp_path / "report.json"
    assert (
        main(
            [
                str(tiny_lm_folder),
                "--output",
                str(tmp_path / "o"),
                "--calib",
                "self",
                *base,
                "--report",
                str(report),
            ]
        )
        == 0
    )
    data = json.loads(report.read_text())
    assert data["summary"]["calibration"].startswith("self (chat prompting, settings v1, generated")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_folder)
    windows, label = self_calibration_windows(
        model, AutoTokenizer.from_pretrained(tiny_lm_folder), 2, 32, progress=False
    )
    assert "cached" in label  # the CLI's run filled the cache with the same windows
    assert data["report"]["calibration_sha256"] == windows_sha256(windows)

    assert (
        main([str(tiny_lm_folder), "--output", str(tmp_path / "s"), "--calib", "self", *base, "--stream"])
        == 1
    )
    err = capsys.readouterr().err
    assert "drop --stream" in err and "--calib FILE" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()
