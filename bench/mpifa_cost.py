"""BENCHMARKS.md §3: wall time and peak host / GPU memory of a whole MPIFA compression.

python bench/mpifa_cost.py                 # SmolLM2-135M on the CPU, 32 x 512 tokens (target <= 3 min)
python bench/mpifa_cost.py --llama7b       # LLaMA-7B shapes, random weights, 128 x 2048 random tokens,
                                           # on a GPU (target <= 15 min, <= 32 GB host RAM)
python bench/mpifa_cost.py --quick         # a tiny LLaMA, seconds (CI smoke test)
"""

from __future__ import annotations

import torch
from harness import RESULTS, PeakRSS, environment, llama_config, print_table, timed, write_json
from harness import parser as harness_parser

from leanformers.pifa import MPIFAConfig, mpifa_compress


def _random_llama(hidden, intermediate, layers, heads, kv_heads, vocab, dtype):
    from transformers import LlamaForCausalLM

    cfg = llama_config(hidden, intermediate, layers, heads, kv_heads, vocab, max_positions=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    return model.to(dtype).eval()


def main(argv: list[str] | None = None) -> dict:
    parser = harness_parser(
        __doc__,
        "tiny random LLaMA (CI smoke test)",
        "result JSON (default bench/results/mpifa_cost[_quick|_llama7b].json)",
    )
    parser.add_argument("--llama7b", action="store_true", help="LLaMA-7B shapes on the GPU")
    parser.add_argument("--nsamples", type=int, default=None)
    parser.add_argument("--seqlen", type=int, default=None)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="with --llama7b: only the first N of the 32 blocks (the row then also gives the time per "
        "block and its 32-block extrapolation, marked as such)",
    )
    args = parser.parse_args(argv)

    if args.llama7b:
        if not torch.cuda.is_available():
            parser.error("--llama7b needs a CUDA device")
        name, target_s, target_gb = "LLaMA-7B shapes (random)", 15 * 60, 32.0
        nsamples, seqlen = args.nsamples or 128, args.seqlen or 2048
        model = _random_llama(4096, 11008, args.layers or 32, 32, 32, 32000, torch.bfloat16)
        calibration = torch.randint(0, 32000, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
        tokenizer = None
    elif args.quick:
        name, target_s, target_gb = "tiny LLaMA (random)", None, None
        nsamples, seqlen = args.nsamples or 8, args.seqlen or 64
        model = _random_llama(64, 96, 2, 4, 2, 128, torch.float32)
        calibration = torch.randint(0, 128, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
        tokenizer = None
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from leanformers.data import shared_data_path
        from leanformers.hub import smollm2_135m

        name, target_s, target_gb = "SmolLM2-135M (GGUF Q4_1 dequantised)", 180, None
        nsamples, seqlen = args.nsamples or 32, args.seqlen or 512
        folder = smollm2_135m()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        calibration = str(shared_data_path("wikitext-2-v1-valid.txt"))

    config = MPIFAConfig(density=args.density, nsamples=nsamples, seqlen=seqlen, batch_size=8)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss, timed() as elapsed:
        report = mpifa_compress(model, tokenizer, config, calibration=calibration)
    seconds = elapsed.seconds
    row = {
        "model": name,
        "device": str(
            config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        ),
        "calibration": f"{nsamples} x {seqlen}",
        "density": f"{report.achieved_density:.4f}",
        "wall time (s)": f"{seconds:.1f}",
        "peak host RSS (GB)": f"{rss.peak_gb:.2f}",
        "peak GPU (GB)": f"{torch.cuda.max_memory_allocated() / 2**30:.2f}"
        if torch.cuda.is_available()
        else "-",
        "target": (f"<= {target_s / 60:.0f} min" if target_s else "-")
        + (f", <= {target_gb:.0f} GB host" if target_gb else ""),
        "met": (
            "yes"
            if (target_s is None or seconds <= target_s) and (target_gb is None or rss.peak_gb <= target_gb)
            else "NO"
        )
        if target_s
        else "-",
    }
    if args.llama7b and args.layers and args.layers != 32:
        row["model"] += f", first {args.layers} of 32 blocks"
        row["s per block"] = f"{seconds / args.layers:.1f}"
        row["32 blocks (extrapolated, not measured)"] = f"{32 * seconds / args.layers:.0f} s"
        row["met"] = "-"  # the targets are for the whole model
    payload = {"env": environment(), "row": row, "report": report.to_dict()}
    name = "mpifa_cost" + ("_quick" if args.quick else "_llama7b" if args.llama7b else "")
    path = write_json(args.output or RESULTS / f"{name}.json", payload)
    print(f"(JSON: {path})")
    print_table([row], list(row))
    return payload


if __name__ == "__main__":
    main()
