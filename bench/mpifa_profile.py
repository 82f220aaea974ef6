"""BENCHMARKS.md §9: where the time of an MPIFA compression goes, as a multiple of a dense forward.

python bench/mpifa_profile.py                      # SmolLM2-135M, 32 x 512 WikiText-2 v1 valid tokens
python bench/mpifa_profile.py --blocks 4 --nsamples 8   # quick iteration (first 4 blocks only)

The run first times one dense forward of the calibration tokens (embeddings + blocks + LM head, batch
``--batch-size``), then runs ``mpifa_compress`` under cProfile and splits its time by stage. Machines
differ and this one is shared, so the result to compare is the ratio compression / dense forward of
the same run. It imports whichever leanformers is first on PYTHONPATH, so the same script profiles
another checkout (``PYTHONPATH=/path/to/other/src``) for a before/after. ``--save-state`` writes the
compressed state dict (to check two versions bitwise), ``--eval-tokens`` adds the WikiText-2 raw test
perplexity of the compressed model.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from pathlib import Path

import torch
from harness import RESULTS, environment, write_json
from harness import parser as harness_parser

# (label, function-name substring, "ct" cumulative or "tt" self time); names of any code version.
PARTS = [
    ("Gram products G, K, S (self time of group_input_stats)", "group_input_stats", "tt"),
    ("compressed-stream replays up to each group (input_of)", "input_of", "ct"),
    ("dense pass, one per block (run_block_capturing)", "run_block_capturing", "ct"),
    ("compressed pass after each block (BlockStreams.advance)", "advance", "ct"),
    ("reconstruct (whitening SVD + M steps)", "reconstruct", "ct"),
    ("  float64 SVD / Gram eigendecomposition", ("linalg_svd>", "linalg_eigh"), "tt"),
    ("  solves, lstsq, Cholesky", ("linalg_solve", "linalg_lstsq", "cholesky"), "tt"),
    ("PIFA conversion (PIFALinear.from_factors, QR with column pivoting)", "from_factors", "ct"),
    ("PIFALinear.forward (compressed stream)", "forward@layer.py", "ct"),
    ("  index_select (PIFA gathers)", "index_select", "tt"),
    ("replay memo checks (torch.equal of inputs, state)", "memo_forward", "tt+eq"),
    ("isfinite", "isfinite", "tt"),
]


def _split(stats: pstats.Stats) -> dict[str, float]:
    rows = stats.stats  # (file, line, name) -> (cc, nc, tt, ct, callers)

    def total(pattern, kind):
        patterns = pattern if isinstance(pattern, tuple) else (pattern,)
        seconds = 0.0
        for (path, _, name), (_, _, tt, ct, _) in rows.items():
            for p in patterns:
                fn, _, file = p.partition("@")
                if fn in name and (not file or path.endswith(file)):
                    seconds += ct if kind == "ct" else tt
                    break
        return seconds

    out = {}
    for label, pattern, kind in PARTS:
        if kind == "tt+eq":  # the memo's own overhead: its frames plus the comparisons it makes
            out[label] = sum(total(p, "tt") for p in ("memo_forward", "_same", "_module_state", "equal"))
        else:
            out[label] = total(pattern, kind)
    return {k: round(v, 2) for k, v in out.items()}


def resplit(pstats_path: str, json_path: str) -> dict:
    """Recompute ``seconds_by_part`` of a result JSON from its ``--pstats`` dump (after PARTS changed)."""
    import json

    payload = json.loads(Path(json_path).read_text())
    payload["seconds_by_part"] = _split(pstats.Stats(pstats_path))
    write_json(json_path, payload)
    return payload


def main(argv: list[str] | None = None) -> dict:
    parser = harness_parser(__doc__, "first 2 blocks, 4 x 128 tokens (smoke test)", "result JSON")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--blocks", type=int, default=None, help="keep only the first N blocks")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the whole run")
    parser.add_argument("--eval-tokens", type=int, default=0, help="WikiText-2 raw test perplexity tokens")
    parser.add_argument("--save-state", default=None, help="write the compressed state dict here")
    parser.add_argument("--pstats", default=None, help="also dump the raw cProfile statistics here")
    parser.add_argument("--label", default="", help="free text stored in the JSON (e.g. the code version)")
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.nsamples, args.seqlen, args.batch_size = 2, 4, 128, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import leanformers
    from leanformers import MPIFAConfig, mpifa_compress
    from leanformers.data import shared_data_path
    from leanformers.data.text import calibration_windows, load_text, tokenize_text
    from leanformers.hub import smollm2_135m

    folder = smollm2_135m()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if args.blocks:
        model.model.layers = model.model.layers[: args.blocks]
        model.config.num_hidden_layers = args.blocks
    ids = tokenize_text(load_text(shared_data_path("wikitext-2-v1-valid.txt")), tokenizer)
    windows = calibration_windows(ids, args.nsamples, args.seqlen, 0)

    with torch.no_grad():
        model(input_ids=windows[:1, :16], use_cache=False)  # warm-up (allocator, kernels)
        start = time.perf_counter()
        for batch in windows.split(args.batch_size):
            model(input_ids=batch, use_cache=False)
        dense_seconds = time.perf_counter() - start
    print(f"dense forward of {args.nsamples} x {args.seqlen} tokens: {dense_seconds:.1f} s", flush=True)

    config = MPIFAConfig(
        density=args.density,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        device="cpu",
    )
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    report = mpifa_compress(model, tokenizer, config, calibration=windows, progress=False)
    profiler.disable()
    compress_seconds = time.perf_counter() - start
    parts = _split(pstats.Stats(profiler))
    if args.pstats:
        profiler.dump_stats(args.pstats)
    print(
        f"mpifa_compress: {compress_seconds:.1f} s = {compress_seconds / dense_seconds:.2f} x the dense forward"
    )
    for label, seconds in parts.items():
        print(f"  {label:<70} {seconds:8.1f} s  {100 * seconds / compress_seconds:5.1f} %")

    payload = {
        "what": "cProfile of mpifa_compress on SmolLM2-135M-Instruct (fp32), WikiText-2 v1 valid calibration, CPU",
        "label": args.label,
        "leanformers_file": leanformers.__file__,
        "env": environment(),
        "threads": torch.get_num_threads(),
        "blocks": args.blocks or len(model.model.layers),
        "calibration": f"{args.nsamples} x {args.seqlen}, batch {args.batch_size}, seed 0",
        "density": args.density,
        "achieved_density": report.achieved_density,
        "dense_forward_seconds": round(dense_seconds, 2),
        "compress_seconds": round(compress_seconds, 2),
        "ratio_compress_to_dense_forward": round(compress_seconds / dense_seconds, 3),
        "seconds_by_part": parts,
    }
    if args.save_state:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, args.save_state)
    if args.eval_tokens:
        from leanformers.eval import perplexity

        test = tokenize_text(load_text(shared_data_path("wikitext-2-raw-test.txt")), tokenizer)
        start = time.perf_counter()
        result = perplexity(model, text=test, seqlen=2048, max_tokens=args.eval_tokens)
        payload["wikitext2_test_ppl"] = {"ppl": result.ppl, "tokens": result.n_tokens, "seqlen": 2048}
        print(f"compressed WikiText-2 raw test ppl: {result.ppl:.4f} ({time.perf_counter() - start:.0f} s)")
    name = "mpifa_profile" + ("_quick" if args.quick else "")
    path = write_json(args.output or RESULTS / f"{name}.json", payload)
    print(f"(JSON: {path})")
    return payload


if __name__ == "__main__":
    main()
