"""FSDP2 through ``transformers.Trainer`` on CPU (gloo), for the multi-process tests.

accelerate 1.x only enters its FSDP mode on accelerators: on CPU (``MULTI_CPU``) it drops the FSDP
plugin the Trainer hands it and trains DDP. :class:`FSDPTrainer` puts the Trainer's accelerator back
into FSDP mode with the plugin built from ``TrainingArguments.fsdp_config`` (what accelerate does on
GPUs), so that accelerate's own FSDP2 code runs unchanged on CPU: ``fully_shard`` of the model,
DTensor parameters and optimizer state, sharded (torch.distributed.checkpoint) checkpoints and their
reload. Nothing else of the Trainer or accelerate is replaced.
"""

from __future__ import annotations

import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import Trainer

from leanformers.training.fsdp import gather_full

FSDP2_CONFIG = {
    "fsdp_version": 2,
    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
    "reshard_after_forward": True,
    "state_dict_type": "SHARDED_STATE_DICT",
}


class FSDPTrainer(Trainer):
    """A ``Trainer`` whose accelerator runs FSDP2 on CPU too (see the module docstring)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and getattr(state, "fsdp_plugin", None) is None:
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True


def gathered_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a whole tensor (collective under FSDP2: every rank calls it)."""
    return {name: gather_full(p.detach()).clone() for name, p in model.named_parameters()}
