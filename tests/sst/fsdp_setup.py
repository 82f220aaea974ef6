"""What the FSDP2 test and its 2-process worker share: the model, the data, the Trainer arguments."""

from __future__ import annotations

import torch
from torch import nn

from tests.tiny_models import VOCAB, tiny_llama

SEQLEN = 16
N_TRAIN = 64
PER_DEVICE_BATCH = 2  # x 2 processes: the single-process reference uses a batch of 4
MAX_STEPS = 8  # 2 SST rounds: a round is 2 iterations of 2 steps
CHECKPOINT_STEP = 5  # mid-iteration, mid-round, during an LR re-warm-up


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = N_TRAIN, seqlen: int = SEQLEN, seed: int = 0):
        self.ids = torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build():
    """(SST PeftModel of a tiny LLaMA, training data): the same on every rank and in the reference."""
    from peft import get_peft_model

    from leanformers import SSTConfig

    config = SSTConfig(r=8, steps_per_iteration=2, warmup_steps_per_iteration=1, iterations_per_round=2)
    return get_peft_model(tiny_llama(seed=0), config), Tokens()


def training_args(output_dir, **overrides):
    from tests.helpers import cpu_training_args

    kwargs = {
        "per_device_train_batch_size": PER_DEVICE_BATCH,
        "max_steps": MAX_STEPS,
        "learning_rate": 0.05,
        "lr_scheduler_type": "constant",
        # SGD with momentum, not Adam: right after SST resets the optimizer state, Adam's first step is
        # lr * sign(gradient) for every element, so gradients that are ~0 and differ only by float rounding
        # (two processes reduce in another order) move by +-lr in opposite directions and the runs part.
        "optim": "sgd",
        "optim_args": "momentum=0.9",
        "data_seed": 0,  # the sampler's order must not come from the (per-rank) global RNG
        "save_strategy": "steps",
        "save_steps": CHECKPOINT_STEP,
    }
    kwargs.update(overrides)
    return cpu_training_args(output_dir, **kwargs)


def fsdp_training_args(output_dir):
    """FSDP2 through the Trainer: decoder layers and the root sharded, sharded (DCP) checkpoints."""
    return training_args(
        output_dir,
        fsdp="full_shard",
        fsdp_config={
            "fsdp_version": 2,
            "state_dict_type": "SHARDED_STATE_DICT",
            "cpu_ram_efficient_loading": False,
        },
        ddp_backend="gloo",
    )


def gathered_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter (FSDP2 shards gathered: a collective) and buffer of ``model``, as plain CPU tensors."""
    from leanformers.training.fsdp import gather_full

    state = {name: gather_full(p.detach()).clone() for name, p in model.named_parameters()}
    state.update({name: b.detach().clone() for name, b in model.named_buffers()})
    return state


def cpu_fsdp2_trainer_class():
    """``transformers.Trainer`` that really runs FSDP2 on CPU (gloo).

    accelerate 1.15 turns an FSDP plugin into ``DistributedType.FSDP`` only on accelerator devices
    (``AcceleratorState``: the MULTI_GPU/NPU/XPU/... branch); on CPU it keeps ``MULTI_CPU``, drops the
    plugin and the Trainer silently trains under DDP. torch's ``fully_shard`` itself runs on CPU/gloo, so
    this subclass sets the accelerate state the Trainer just built to FSDP with the plugin made from the
    Trainer's own ``fsdp_plugin_args``; everything after that (``fsdp2_prepare_model``, the sharded
    optimizer, DCP checkpoints, resume) is the unmodified accelerate / Trainer code a GPU run takes.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import Trainer

    class CPUFSDP2Trainer(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            if state.distributed_type == DistributedType.MULTI_CPU and self.args.fsdp_plugin_args:
                # as accelerate does for GPUs: the process state too (every AcceleratorState() copies it back)
                state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                self.is_fsdp_enabled = True

    return CPUFSDP2Trainer


def comparable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each SST layer's factors replaced by its effective weight U_eff diag(S) Vh_eff (and S).

    Singular vectors are defined up to sign (and rotation inside near-equal singular values): two re-SVDs of
    matrices that differ by float rounding may return flipped U / Vh columns for the same weight, so runs
    that differ by rounding are compared on the weights they compute with, not on raw U / Vh.
    """
    from leanformers.sst.spectral import effective_weight

    out = {k: v for k, v in state.items() if ".sst_" not in k}
    for key in [k for k in state if ".sst_S." in k]:
        prefix, adapter = key.split(".sst_S.")
        f = {
            n: state[f"{prefix}.sst_{n}.{adapter}"]
            for n in ("U", "S", "Vh", "index", "U_active", "Vh_active")
        }
        out[f"{prefix}.weight"] = effective_weight(
            f["U"], f["S"], f["Vh"], f["index"], f["U_active"], f["Vh_active"]
        )
        out[f"{prefix}.S"] = f["S"]
    return out
