"""The contract table: every user workflow of every method on every model family, as data.

How it works
------------
One row = ``(method, family, operation)`` plus what the row expects. ``test_contract.py`` runs
every row through ``CHECKS[operation]`` (``checks.py``): one generic check per operation, the same
for all methods, in the spirit of peft's ``tests/test_custom_models.py`` (one list of test cases,
generic ``_test_*`` functions). A row expects one of two things:

- nothing declared: the operation works and the check's assertion holds (exact reload, the right
  parameters trained, identical ranks, ...);
- ``refuses=("ExceptionType", "message fragment")``: a documented refusal. The operation must raise
  that type (or a subclass) with that fragment in the message; the check then also asserts that the
  error is a clear one (not a bare KeyError / AttributeError / IndexError).

Method quirks are declared here (``Method`` fields and ``QUIRKS``), never by copying a test.

Adding things
-------------
- a model family: write a tiny builder in ``tests/tiny_models.py`` (from config, seconds to build)
  and add a ``Family`` to ``FAMILIES`` (its task, its Auto class, the DST target regex of its
  linear layers). Every method whose ``families`` is ``None`` picks it up.
- a method: add a ``Method`` to ``METHODS``: ``kind`` selects how ``checks.wrap`` builds it
  ("sst" -> peft.get_peft_model + SSTCallback, "dst" -> CHTssCallback, "compress" -> leanformers.compress
  with the config of the compressor ``options["method"]``),
  ``options`` are passed to its config, ``trains`` is a regex of the parameter names one optimizer
  step must change (every other parameter must stay bit-identical), ``operations`` lists the
  operations that apply, ``families`` restricts the families (None: all).
- an operation: write ``check_<name>(row, tmp_path)`` in ``checks.py``, register it in
  ``checks.CHECKS`` and list it in the ``operations`` of the methods it applies to. Operations whose
  work is batched (fresh-process reloads, the 2-process run) read a session fixture instead of
  starting their own process: see ``PERSIST_OPS`` / ``DDP_OP`` and ``test_contract.py``.
- a known refusal: add ``QUIRKS[(method, family, operation)] = {"refuses": (type, fragment)}``
  (``family`` may be ``"*"``) with a comment saying why the refusal is the right behaviour.

Rows that need a fix not yet merged stay asserting the correct behaviour (they fail until then);
they are never weakened or silently xfailed. ``test_table_keeps_every_issue_row_and_every_family``
pins the rows that catch issue 7's silent failures, so none can be dropped from the table unnoticed.

Running
-------
``pytest tests/contract`` (about 2 min of one CPU core); one row: ``-k "sst_ft-bert_cls-persist"``
(test ids are ``method-family-operation``). Selecting any persistence row saves every persistence
row and reloads them all in one fresh process (``fresh_reload.py``); selecting any ddp row runs all
of them in one 2-process launch (``dist_worker.py``), and likewise any fsdp2 row (FSDP2 through the
Trainer on CPU: ``tests/fsdp_trainer.py``). A method joins the fsdp2 launch by listing ``FSDP2_OP``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tests import tiny_models

# ----------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    name: str
    builder: str  # function name in tests/tiny_models.py
    task: str  # "causal" | "seq_cls" | "seq2seq"
    auto_class: str  # transformers Auto class that reloads the task model
    dst_targets: tuple[str, ...]  # CHTss targets: the block projections of this architecture
    peft_task_type: str  # peft TaskType of the family's head

    def build(self, seed: int = 0):
        return getattr(tiny_models, self.builder)(seed=seed)


_DECODER_PROJ = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
_OPT_PROJ = r"layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)$"

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", "tiny_llama", "causal", "AutoModelForCausalLM", (_DECODER_PROJ,), "CAUSAL_LM"),
        Family("qwen2", "tiny_qwen2", "causal", "AutoModelForCausalLM", (_DECODER_PROJ,), "CAUSAL_LM"),
        Family("opt", "tiny_opt", "causal", "AutoModelForCausalLM", (_OPT_PROJ,), "CAUSAL_LM"),
        # GPT-2: Conv1D layers, weights stored (in, out)
        Family(
            "gpt2",
            "tiny_gpt2",
            "causal",
            "AutoModelForCausalLM",
            (r"h\.\d+\.(attn|mlp)\.c_\w+$",),
            "CAUSAL_LM",
        ),
        Family(
            "bert_cls",
            "tiny_bert_cls",
            "seq_cls",
            "AutoModelForSequenceClassification",
            (r"encoder\.layer\.\d+\..*(query|key|value|dense)$",),
            "SEQ_CLS",
        ),
        Family("bart", "tiny_bart", "seq2seq", "AutoModelForSeq2SeqLM", (_OPT_PROJ,), "SEQ_2_SEQ_LM"),
    )
}

# ----------------------------------------------------------------------------- operations

TRAINER_OPS = ("train_step", "grad_accum", "bf16", "grad_ckpt", "eval", "generate")
# batched: one fresh process reloads every saved row (see test_contract.py)
PERSIST_OPS = ("persist", "persist_merged", "persist_base", "persist_noimport")
RESUME_OPS = ("resume",)
PEFT_OPS = (
    "count",
    "merge_and_unload",
    "merge_unmerge",
    "disable_adapter",
    "unload",
    "delete_adapter",
    "add_set_adapter",
)
SST_ONLY_OPS = ("no_controller_warns",)
DST_ONLY_OPS = ("config_method", "masks_with_model", "recipe_errors")
DDP_OP = "ddp"  # batched: one 2-process gloo launch runs every ddp row
FSDP2_OP = "fsdp2"  # batched: one 2-process gloo launch runs every fsdp2 row (Trainer + FSDP2 on CPU)
DIST_OPS = (DDP_OP, FSDP2_OP)
# bad inputs a user hands over or receives (issue 19; bad_inputs.py): each row declares its refusal in QUIRKS
BAD_INPUT_OPS = (
    "load_duplicate_index",
    "load_index_out_of_range",
    "load_missing_index",
    "load_string_spec",
    "load_truncated_shard",
    "yaml_wrong_type",
    "nan_setting",
    "negative_setting",
    "non_utf8_calibration",
    "rank_deficient_weight",
    "heal_lr_without_healing",
    "negative_heal_lr",
    "empty_distill_dataset",
    "too_many_self_segments",
    "tasks_data_dir_without_tasks",
)

# ----------------------------------------------------------------------------- methods

# What every compressor's output must support (the stream row needs a causal LM: see _applies).
COMPRESS_OPS = ("persist", "eval", "generate", "stream")
# row name -> registered compressor name
BASELINES = {
    "svd": "svd",
    "svd_llm": "svd-llm",
    "asvd": "asvd",
    "wanda24": "wanda-2:4",
    "sparsegpt24": "sparsegpt-2:4",
}


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "sst" | "dst" | "compress"
    options: dict = field(default_factory=dict)
    trains: str = ".*"  # regex (re.search) of parameter names one optimizer step changes
    operations: tuple[str, ...] = ()
    families: tuple[str, ...] | None = None  # None: every family
    reload_seed: int = 1  # seed of the base model rebuilt in the fresh process (peft reload)
    rewires: bool = True  # its sampled indices / masks change during a 6-step run


# SST pretrain: S, the active vectors and every non-SST parameter train; U/Vh are frozen buffers.
_SST = dict(r=4, steps_per_iteration=2, warmup_steps_per_iteration=0, iterations_per_round=2)
# DST methods: update_interval 2 so that a 6-step run rewires at steps 2, 4, 6.
_DST = dict(update_interval=2, topology_end=1.0, zeta=0.3)
_MEST = dict(preset="set", removal="mest")  # "preset": the for_method() name, when not the method's

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "sst",
            "sst",
            dict(_SST, mode="pretrain"),
            trains=r"^(?!.*\.original_module\.)",  # a modules_to_save head trains its copy
            operations=TRAINER_OPS
            + ("persist", "persist_merged", "count", "merge_and_unload")
            + RESUME_OPS
            + SST_ONLY_OPS
            + (DDP_OP,),
        ),
        # SST fine-tuning: only S, the active vectors and the task head (classifier / score) train;
        # the frozen base comes from the same seed on reload.
        Method(
            "sst_ft",
            "sst",
            dict(_SST, mode="finetune"),
            trains=r"sst_(S|U_active|Vh_active)\.|(classifier|score)\.(?!original_module)",
            operations=("train_step", "grad_ckpt", "eval", "persist", "load_duplicate_sst_index")
            + PEFT_OPS
            + ("compact_adapter",),
            families=("llama", "gpt2", "bert_cls", "bart"),
            reload_seed=0,
        ),
        # The DST presets: every parameter trains; targeted weights stay zero outside their masks.
        Method(
            "chtss",
            "dst",
            dict(_DST, initial_density=0.6, final_density=0.4),
            operations=TRAINER_OPS + ("persist",) + RESUME_OPS + DST_ONLY_OPS + (DDP_OP, FSDP2_OP),
        ),
        *(
            Method(
                preset,
                "dst",
                # MEST has no preset: SET's random regrowth with the |w| + lambda |grad| removal score
                dict(_DST, final_density=0.5, **(_MEST if preset == "mest" else {})),
                operations=("train_step", "grad_accum", "resume", "config_method", DDP_OP, FSDP2_OP),
                families=("llama", "gpt2"),
                rewires=preset != "static",
            )
            for preset in ("chts", "set", "rigl", "mest", "static")
        ),
        # MPIFA: compress (random calibration ids), save_compressed, reload through transformers.
        Method(
            "mpifa",
            "compress",
            dict(method="mpifa", density=0.5, nsamples=4, seqlen=16),
            operations=(
                "persist",
                "persist_base",
                "persist_noimport",
                "eval",
                "generate",
                "bf16_storage",
                "stream",
                "quiet",
                *BAD_INPUT_OPS,
            ),
        ),
        # The "mpifa" row runs the defaults, OWL block densities included (issue 20, stop 32); the opt-out
        # (owl=False, `--no-owl`: one density for every block) must save and reload the same way.
        Method(
            "mpifa_no_owl",
            "compress",
            dict(method="mpifa", density=0.5, nsamples=4, seqlen=16, owl=False),
            operations=("persist", "eval"),
        ),
        # MPIFA with the data-driven rank allocation and Gram shrinkage (issue 10): uneven ranks per
        # linear must survive save / reload in every family.
        Method(
            "mpifa_spectrum",
            "compress",
            dict(method="mpifa", density=0.5, nsamples=4, seqlen=16, allocation="spectrum", shrinkage=0.1),
            operations=("persist", "eval", "generate", "quiet"),
        ),
        # The baselines (issue 18): the same user workflows as MPIFA. Low-rank ones reload through the
        # quantizer; pruned ones (2:4) are plain checkpoints that reload without leanformers.
        *(
            Method(name, "compress", dict(method=method, nsamples=4, seqlen=16), operations=COMPRESS_OPS)
            for name, method in BASELINES.items()
        ),
        # Self-calibration (issue 20): the model writes its own windows (no tokenizer: BOS-started
        # documents from the config's ids; families whose tiny configs have usable BOS ids).
        Method(
            "mpifa_self",
            "compress",
            dict(method="mpifa", density=0.5, nsamples=4, seqlen=16, calibration="self"),
            operations=("persist", "eval", "generate", "stream", "quiet"),
            families=("llama", "opt"),
        ),
        # Healing by distillation (issue 20): the compressed factors trained to match the dense model
        # must save and reload exactly like any MPIFA model.
        Method(
            "mpifa_healed",
            "compress",
            dict(method="mpifa", density=0.5, nsamples=4, seqlen=16, heal_tokens=64),
            operations=(
                "persist",
                "eval",
                "generate",
                "distill_recipe",
                "distill_recipe_discard",
                "heal_discard",
            ),
            families=("llama", "qwen2", "opt", "gpt2"),
        ),
    )
}

# ----------------------------------------------------------------------------- quirks

# SST replaces each targeted weight by its SVD factors and frees the dense weight (that is where its
# memory saving comes from), so the untouched base model no longer exists: disable_adapter / unload
# refuse and point to merge_and_unload. One SST adapter per model: a second one refuses.
_SST_FREED = {"refuses": ("RuntimeError", "freed")}
_SST_ONE_ADAPTER = {"refuses": ("ValueError", "SST supports one adapter per model")}
# The adapter holds the only copy of the targeted weights: deleting it refuses, naming merge_and_unload.
_SST_NO_DELETE = {"refuses": ("RuntimeError", "merge_and_unload")}

# Bad inputs (issue 19): refused with the module or field named, never loaded or run silently.
_BAD_INPUTS = {
    "load_duplicate_index": ("ValueError", "model.layers.0.mlp.down_proj.input_index is not a permutation"),
    "load_index_out_of_range": ("ValueError", "model.layers.0.mlp.down_proj.input_index holds"),
    "load_missing_index": (
        "ValueError",
        "model.layers.0.mlp.down_proj: the checkpoint has no 'input_index' tensor",
    ),
    "load_string_spec": ("ValueError", "['model.layers.0.mlp.down_proj'].input_permuted must be a JSON bool"),
    "load_truncated_shard": ("ValueError", "model.safetensors is truncated"),
    "yaml_wrong_type": ("ValueError", "overwrite must be a bool, got 'false'"),
    "nan_setting": ("ValueError", "damping must be a finite number, got nan"),
    "negative_setting": ("ValueError", "damping must be >= 0"),
    "non_utf8_calibration": ("ValueError", "calib.json is not UTF-8 text"),
    "heal_lr_without_healing": (
        "ValueError",
        "--heal-lr sets the learning rate of healing, which runs only with",
    ),
    "negative_heal_lr": ("ValueError", "healing learning_rate must be > 0, got -3e-05"),
    "empty_distill_dataset": ("ValueError", "the distillation training dataset is empty"),
    "too_many_self_segments": ("ValueError", "17 segments leave fewer than 2 tokens each in a window of 32"),
    "tasks_data_dir_without_tasks": ("ValueError", "--tasks-data-dir names where --tasks reads its files"),
}

QUIRKS: dict[tuple[str, str, str], dict] = {
    ("sst_ft", "*", "load_duplicate_sst_index"): {"refuses": ("ValueError", "repeats an index")},
    **{("mpifa", "*", op): {"refuses": refusal} for op, refusal in _BAD_INPUTS.items()},
    ("sst_ft", "*", "disable_adapter"): _SST_FREED,
    ("sst_ft", "*", "unload"): _SST_FREED,
    ("sst_ft", "*", "add_set_adapter"): _SST_ONE_ADAPTER,
    ("sst_ft", "*", "delete_adapter"): _SST_NO_DELETE,
    # Streaming holds one block at a time, so the model cannot generate its calibration text: refused,
    # naming the alternatives (a text source, or compressing in memory).
    ("mpifa_self", "*", "stream"): {"refuses": ("ValueError", "drop --stream")},
}


def _applies(method: Method, family: Family, op: str) -> bool:
    if op == "generate" and family.task == "seq_cls":
        return False  # a classifier does not generate
    if op == "stream" and family.task != "causal":
        return False  # streaming compression rebuilds a causal LM from its config
    method_level = (
        *DIST_OPS,
        *BAD_INPUT_OPS,
        "load_duplicate_sst_index",
        "config_method",
        "no_controller_warns",
        "recipe_errors",
        "distill_recipe",
        "distill_recipe_discard",
    )
    if op in method_level and family.name != "llama":
        return False  # method-level properties: one family is enough
    if op in PEFT_OPS and family.name not in ("llama", "gpt2", "bert_cls"):
        return False
    return not (op == "persist_noimport" and family.name != "llama")  # one family shows the guard


@dataclass(frozen=True)
class Row:
    method: Method
    family: Family
    op: str
    refuses: tuple[str, str] | None = None

    @property
    def id(self) -> str:
        return f"{self.method.name}-{self.family.name}-{self.op}"


def _rows() -> list[Row]:
    rows = []
    for method in METHODS.values():
        for family in FAMILIES.values():
            if method.families is not None and family.name not in method.families:
                continue
            for op in method.operations:
                if not _applies(method, family, op):
                    continue
                quirk = QUIRKS.get((method.name, family.name, op)) or QUIRKS.get((method.name, "*", op)) or {}
                rows.append(Row(method, family, op, **quirk))
    return rows


ROWS: list[Row] = _rows()
