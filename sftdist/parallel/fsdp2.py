"""``strategy=fsdp2``: ``fully_shard`` on each decoder layer, then the root; parameters, gradients and
optimizer state sharded over the ranks. Gradients are reduce-scattered (averaged) in every micro-batch's
backward and accumulate as shards (``strategy.grad_sync=last``: unsharded gradients accumulate locally and are
reduce-scattered once, after the step's last micro-batch). precision=bf16 computes in bf16 and reduces in fp32."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from sftdist.config import StrategyConfig
from sftdist.model.blocks import decoder_layers
from sftdist.parallel.dist import DistributedStrategy


class FSDP2Strategy(DistributedStrategy):
    def __init__(self, cfg: StrategyConfig, device: str, precision: str):
        super().__init__("fsdp2", device, cfg.timeout_minutes)
        self.cfg, self.precision = cfg, precision

    def setup(
        self, model: torch.nn.Module, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        offload = CPUOffloadPolicy() if self.cfg.cpu_offload else OffloadPolicy()
        # No model.to(device) first: fully_shard moves one layer at a time and keeps its shard only, so a
        # GPU never holds the whole unsharded model.
        kwargs = {"mesh": mesh, "mp_policy": mp, "offload_policy": offload}
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=self.cfg.reshard_after_forward, **kwargs)
        fully_shard(model, reshard_after_forward=False, **kwargs)  # the root is needed again at once by backward
        self._model = model
        return model, make_optimizer(model)

    def micro_step(self, last: bool):
        if self.cfg.grad_sync == "last":
            self._model.set_requires_gradient_sync(last)
        return super().micro_step(last)

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else {}
