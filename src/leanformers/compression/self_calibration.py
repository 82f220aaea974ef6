"""Self-calibration: the model being compressed writes its own calibration text.

The idea is Williams, Chrysostomou and Aletras, "Self-calibration for Language Model Quantization and
Pruning" (NAACL 2025): sampled text from the model approximates the distribution it was trained on,
needs no dataset, and works offline. The settings and the code here are ours:

- prompting: an instruct model (its tokenizer has a chat template) answers a fixed list of neutral user
  turns (``NEUTRAL_TURNS``), one after the other in a seeded order, as one conversation per window (the
  template's own tokens included: they are what a chat model reads in use); a base model starts every
  document from its BOS token (the EOS token when it has none) and a new document after each EOS;
- sampling: nucleus sampling (top-p 0.95) at temperature 1.0: the model's own distribution without its
  far tail. A schedule (``temperature_start`` for the first token of every answer or document, linear to
  ``temperature_end`` over ``temperature_tokens``) is available; 1.0 -> 0.7 (more coherent text) was worse
  on the validation texts (docs/benchmarks.md §19: a narrower text calibrates a narrower model);
- windows: ``nsamples`` windows of exactly ``seqlen`` tokens, generated in batches with a KV cache
  (allocated once after the prompt's forward, ``kv_buffer.buffer_kv_cache_``: the same logits as
  transformers' growing cache). Every row advances one token per step (a prompt's tokens are fed one per
  step as well), so no padding is needed. Window ``k`` draws its turn order and its sampling numbers from
  its own generator, seeded from (seed, k), so in exact arithmetic its text does not depend on which windows
  share its batch. In floating point a batch of another size can change a logit's last bits and, at a near
  tie, a sampled token (SmolLM2-135M, 24 x 512 windows: batches of 16 + 8 and one batch of 24 gave the same
  windows but one, which parted at its token 356); ``batch_size`` is therefore part of the cache key. The
  thread count can change them the same way (docs/benchmarks.md §20). ``segments`` > 1 makes a window of
  that many shorter, independent chats / documents (segment j seeded from (seed, k, j)) generated side by
  side (fewer, wider decode steps: 2.3x faster at 4 segments on a CPU); the default keeps one, which the
  validation texts preferred (§20);
- cache (``self_calibration_cache``): windows are stored under ``leanformers.hub.cache_dir() /
  "self-calibration"``, keyed by the sha256 of the model's weights, the prompt and stop tokens, the
  settings, the window shape, the seed and the torch version; a cache hit returns the same windows (their
  hash is checked on read).

The bytes of sampled text depend on floating-point results, so they may differ across torch versions,
devices and CPUs: the windows' hash is recorded with every compression (``report.calibration_sha256``),
not promised.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from itertools import chain

import torch
from tqdm.auto import tqdm

from leanformers.compression.kv_buffer import buffer_kv_cache_
from leanformers.compression.self_calibration_cache import (
    cache_path,
    model_sha256,
    read_windows,
    windows_key,
    write_windows,
)
from leanformers.compression.text_sampling import sample_top_p, temperature_at, window_seed

__all__ = [
    "DEFAULT_SETTINGS",
    "NEUTRAL_TURNS",
    "Prompting",
    "SelfCalibrationSettings",
    "generate_self_calibration",
    "model_sha256",
    "prompting_for",
    "self_calibration_windows",
]

# Fixed before any measurement and never tuned on an evaluation text: everyday requests across
# explanation, narrative, advice, reasoning and code, none naming a domain of the project's test texts.
NEUTRAL_TURNS: tuple[str, ...] = (
    "Tell me about something you find interesting.",
    "Explain how a common household object works.",
    "Write a short story about a journey.",
    "What are some good habits for staying healthy?",
    "Describe a city you would like to visit and why.",
    "Explain a scientific idea in simple terms.",
    "Write a Python function that solves a small everyday problem, and explain it.",
    "What happened during an important event in history?",
    "Give me advice on learning a new skill.",
    "Write a letter to a friend about your week.",
    "Compare two ways of solving the same problem.",
    "Explain how to cook a simple meal, step by step.",
    "What should someone know before starting a new job?",
    "Describe an animal and how it lives.",
    "Write a short dialogue between two people who just met.",
    "How does the internet deliver a web page to a computer?",
    "Summarize the plot of a story you know.",
    "What are the pros and cons of working from home?",
    "Explain a math concept with an example.",
    "Write a product description for an ordinary tool.",
    "How do plants grow from seeds?",
    "Give me a plan for a relaxing weekend.",
    "Explain what a computer program does when it runs.",
    "Describe the weather and the seasons where you imagine living.",
)


@dataclass(frozen=True)
class SelfCalibrationSettings:
    """How the text is sampled (fixed, documented defaults; every field is part of the cache key).

    Attributes:
        temperature_start, temperature_end: the temperature of the first sampled token of an answer /
            document, and the one reached after ``temperature_tokens`` tokens (linear in between).
        top_p: nucleus sampling mass in (0, 1].
        batch_size: windows generated together (memory: the KV cache of batch_size x seqlen tokens). A
            step's cost on a CPU is mostly reading the weights, so a batch of 24 costs little more per step
            than one of 16: the demo's 24 x 512 windows took 138 s in one batch against 193 s in 16 + 8
            (one thread, SmolLM2-135M).
        segments: independent rows (conversations / documents) a window is made of: a window of seqlen
            tokens concatenates ``segments`` rows of about seqlen / segments tokens, generated side by
            side, so a batch of windows takes 1 / segments of the decode steps with ``segments`` times the
            rows per step (the same KV cache memory).
        turns: the user turns of instruct models.
        version: bumped whenever the generation procedure changes (it invalidates cached windows).
    """

    temperature_start: float = 1.0
    temperature_end: float = 1.0
    temperature_tokens: int = 16
    top_p: float = 0.95
    batch_size: int = 32
    segments: int = 1
    turns: tuple[str, ...] = NEUTRAL_TURNS
    version: int = 1

    def schedule(self) -> tuple[float, float, int]:
        """(start, end, tokens) of the temperature schedule (``text_sampling.temperature_at``)."""
        return self.temperature_start, self.temperature_end, self.temperature_tokens

    def __post_init__(self) -> None:
        for name in ("temperature_start", "temperature_end"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        for name in ("temperature_tokens", "batch_size", "segments"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.turns or not all(isinstance(t, str) and t.strip() for t in self.turns):
            raise ValueError("turns must be a non-empty list of non-empty strings")


DEFAULT_SETTINGS = SelfCalibrationSettings()


# ----------------------------------------------------------------------------- prompting


@dataclass(frozen=True)
class Prompting:
    """The token ids the generator feeds: ``first[i]`` opens a window with turn i, ``follow[i]`` follows a
    sampled stop token with turn i (chat), ``stops`` end an answer / document. Base models: one "turn"."""

    mode: str  # "chat" | "bos"
    first: tuple[tuple[int, ...], ...]
    follow: tuple[tuple[int, ...], ...]
    stops: tuple[int, ...]

    def key(self) -> dict:
        return dataclasses.asdict(self)


def _ids_of(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _chat_prompting(tokenizer, model, turns: tuple[str, ...]) -> Prompting:
    def render(messages, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    marker = "\u2063answer\u2063"  # an invisible separator: cannot occur in a template
    first, follow = [], []
    for turn in turns:
        first.append(ids(render([{"role": "user", "content": turn}], True)))
        convo = [
            {"role": "user", "content": turns[0]},
            {"role": "assistant", "content": marker},
            {"role": "user", "content": turn},
        ]
        tail = render(convo, True).split(marker, 1)[1]
        eos = tokenizer.eos_token or ""
        follow.append(ids(tail[len(eos) :] if eos and tail.startswith(eos) else tail))
    generation = getattr(model, "generation_config", None)
    stops = _ids_of(getattr(generation, "eos_token_id", None)) + _ids_of(tokenizer.eos_token_id)
    if not stops:
        raise ValueError(
            "self-calibration: the tokenizer and the model's generation_config name no EOS token"
        )
    return Prompting("chat", tuple(first), tuple(follow), tuple(sorted(set(stops))))


def prompting_for(model, tokenizer, settings: SelfCalibrationSettings = DEFAULT_SETTINGS) -> Prompting:
    """Chat turns when ``tokenizer`` has a chat template, else BOS-started documents (the BOS / EOS ids of
    the tokenizer, or of the model's config when no tokenizer is given)."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return _chat_prompting(tokenizer, model, settings.turns)
    source = tokenizer if tokenizer is not None else getattr(model, "config", None)
    bos = getattr(source, "bos_token_id", None)
    eos = getattr(source, "eos_token_id", None)
    eos = _ids_of(eos)
    start = bos if bos is not None else (eos[0] if eos else None)
    if start is None:
        raise ValueError(
            "self-calibration needs a start token: the "
            f"{'tokenizer' if tokenizer is not None else 'model config (no tokenizer given)'} has neither "
            "bos_token_id nor eos_token_id; pass a tokenizer that has them, or calibrate on text"
        )
    follow = (start,) if bos is not None else ()  # a new document after each EOS
    return Prompting("bos", ((start,),), (follow,), tuple(sorted(set(eos))))


# ----------------------------------------------------------------------------- generation


def _check_generative(model) -> None:
    """A decoder-only causal LM with its weights, or a ValueError saying what to calibrate on instead."""
    config = getattr(model, "config", None)
    if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
        raise ValueError(
            f"calibration 'self' generates text with the model, and {type(model).__name__} is not a causal "
            "language model (it has no output embeddings): calibrate it on text or token windows"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"calibration 'self' samples decoder-only causal language models; {type(model).__name__} is an "
            "encoder-decoder model: calibrate it on text or token windows"
        )
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("self-calibration needs the model's weights; some are on the meta device")


def _check_model(model, prompting: Prompting, seqlen: int) -> torch.device:
    config = getattr(model, "config", None)
    vocab = model.get_output_embeddings().weight.shape[0]
    used = set(chain(*prompting.first, *prompting.follow, prompting.stops))
    if used and max(used) >= vocab:
        raise ValueError(
            f"self-calibration: token id {max(used)} (a prompt, BOS or EOS token) lies outside the model's "
            f"vocabulary of {vocab}: pass the model's own tokenizer"
        )
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seqlen > limit:
        raise ValueError(f"self-calibration: seqlen {seqlen} exceeds the model's {limit} positions")
    return next(model.parameters()).device


def _cache_of(result):
    """The cache a forward returned (``past_key_values`` before transformers 5.25)."""
    past = getattr(result, "cache", None)
    return result.past_key_values if past is None else past


def _generate_rows(model, prompting, seeds, length, settings, device, bar) -> torch.Tensor:
    """One batch of rows, row i sampled from a generator seeded ``seeds[i]``: (len(seeds), length) ids (see
    the module docstring)."""
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    n_turns = len(prompting.first)
    orders = [torch.randperm(n_turns, generator=g).tolist() for g in gens]
    uniform = torch.stack([torch.rand(length, generator=g, dtype=torch.float64) for g in gens])
    queues = [list(prompting.first[order[0]]) for order in orders]
    turns_done = [1] * len(seeds)
    out = torch.empty(len(seeds), length, dtype=torch.long)
    start = min(length, *(len(q) for q in queues))  # the forced prefix every row has: one forward
    for b, q in enumerate(queues):
        out[b, :start] = torch.tensor(q[:start])
        del q[:start]
    position = torch.zeros(len(seeds), dtype=torch.long)  # tokens sampled since the last prompt
    stops = torch.tensor(prompting.stops or [-1])
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    result = model(input_ids=out[:, :start].to(device), use_cache=True)
    buffer_kv_cache_(_cache_of(result), length)  # the same numbers without a copy per step
    bar.update(start * len(seeds))
    for s in range(start, length):
        logits = result.logits[:, -1].float().cpu()
        forced = torch.tensor([bool(q) for q in queues])
        free = (~forced).nonzero().flatten()
        if free.numel():
            picked = sample_top_p(
                logits[free],
                temperature_at(position[free], *settings.schedule()),
                settings.top_p,
                uniform[free, s],
            )
            out[free, s] = picked
            position[free] += 1
        for b in forced.nonzero().flatten().tolist():
            out[b, s] = queues[b].pop(0)
            position[b] = 0
        for b in free[torch.isin(out[free, s], stops)].tolist():  # an answer / document ended
            queues[b] = list(prompting.follow[orders[b][turns_done[b] % n_turns] if n_turns > 1 else 0])
            turns_done[b] += 1
            position[b] = 0
        if s + 1 < length:
            result = model(
                input_ids=out[:, s : s + 1].to(device), use_cache=True, **{cache_arg: _cache_of(result)}
            )
        bar.update(len(seeds))
    return out


def _row_length(seqlen: int, segments: int) -> int:
    """Tokens generated per row: ceil(seqlen / segments)."""
    return -(-seqlen // segments)


def _generate_windows(model, prompting, indices, seqlen, seed, settings, device, bar) -> torch.Tensor:
    """Windows ``indices`` of a run: (len(indices), seqlen) ids. A window concatenates its
    ``settings.segments`` rows, the first seqlen % segments of them ceil(seqlen / segments) tokens long and
    the others one token shorter (all generated to the longer length, then cut)."""
    segments = settings.segments
    short, extra = divmod(seqlen, segments)
    seeds = [window_seed(seed, k, j) for k in indices for j in range(segments)]
    rows = _generate_rows(model, prompting, seeds, _row_length(seqlen, segments), settings, device, bar)
    rows = rows.reshape(len(indices), segments, -1)
    return torch.cat([rows[:, j, : short + (j < extra)] for j in range(segments)], dim=1)


@torch.no_grad()
def generate_self_calibration(
    model,
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    settings: SelfCalibrationSettings = DEFAULT_SETTINGS,
    *,
    progress: bool = True,
) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens sampled from ``model`` (no cache; see
    ``self_calibration_windows``). The model runs where its weights are, in their dtype.

    Returns:
        (nsamples, seqlen) LongTensor on the CPU.
    """
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"self-calibration needs nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    if seqlen // settings.segments < 2:
        raise ValueError(
            f"self-calibration: {settings.segments} segments leave fewer than 2 tokens each in a window of "
            f"{seqlen}: use at most {seqlen // 2} segments, or longer windows"
        )
    _check_generative(model)
    prompting = prompting_for(model, tokenizer, settings)
    device = _check_model(model, prompting, seqlen)
    was_training = model.training
    model.eval()
    try:
        total = nsamples * settings.segments * _row_length(seqlen, settings.segments)
        with tqdm(total=total, unit="tok", desc="self-calibration", disable=not progress) as bar:
            parts = [
                _generate_windows(
                    model,
                    prompting,
                    range(i, min(i + settings.batch_size, nsamples)),
                    seqlen,
                    seed,
                    settings,
                    device,
                    bar,
                )
                for i in range(0, nsamples, settings.batch_size)
            ]
    finally:
        model.train(was_training)
    return torch.cat(parts)


def self_calibration_windows(
    model,
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    settings: SelfCalibrationSettings = DEFAULT_SETTINGS,
    *,
    cache: bool = True,
    progress: bool = True,
) -> tuple[torch.Tensor, str]:
    """Self-generated calibration windows, from the cache when the same model, tokenizer, settings, shape,
    seed and torch version produced them before. Returns ((nsamples, seqlen) ids, a label)."""
    prompting = prompting_for(model, tokenizer, settings)
    material = {
        "model_sha256": model_sha256(model),
        "prompting": prompting.key(),
        "settings": dataclasses.asdict(settings),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "torch": torch.__version__,
    }
    key = windows_key(material)
    path = cache_path(key)
    windows = read_windows(path, nsamples, seqlen) if cache and path.exists() else None
    origin = "cached"
    if windows is None:
        windows = generate_self_calibration(
            model, tokenizer, nsamples, seqlen, seed, settings, progress=progress
        )
        origin = "generated"
        if cache:
            write_windows(path, windows, material)
    label = (
        f"self ({prompting.mode} prompting, settings v{settings.version}, {origin}, key {key[:12]}): "
        f"{nsamples} x {seqlen} tokens, seed {seed}"
        + (f", {settings.segments} segments per window" if settings.segments > 1 else "")
    )
    return windows, label
