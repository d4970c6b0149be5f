"""``strategy=fsdp2``: ``fully_shard`` on each decoder layer, then the root; parameters, gradients and
optimizer state sharded over the ranks. Gradients are reduce-scattered (averaged) in every micro-batch's
backward and accumulate as shards (``strategy.grad_sync=last``: unsharded gradients accumulate locally and are
reduce-scattered once, after the step's last micro-batch). precision=bf16 computes in bf16 and reduces in fp32."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor

from sftdist.config import StrategyConfig
from sftdist.model import ModelWeights, parameters_on_meta
from sftdist.model.blocks import decoder_layers
from sftdist.parallel.dist import DistributedStrategy


class FSDP2Strategy(DistributedStrategy):
    def __init__(self, cfg: StrategyConfig, device: str, precision: str):
        super().__init__("fsdp2", device, cfg.timeout_minutes, cfg.context_parallel)
        self.cfg, self.precision = cfg, precision

    loads_weights = True  # built on the meta device, sharded, then each rank loads its shards

    def constructing(self):
        return parameters_on_meta()

    def setup(
        self,
        model: torch.nn.Module,
        make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
        weights: Callable[[list[str]], ModelWeights] | None = None,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        offload = CPUOffloadPolicy() if self.cfg.cpu_offload else OffloadPolicy()
        kwargs = {"mesh": mesh, "mp_policy": mp, "offload_policy": offload}
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=self.cfg.reshard_after_forward, **kwargs)
        fully_shard(model, reshard_after_forward=False, **kwargs)  # the root is needed again at once by backward
        load_shards(model, weights, self.device)
        self._model = model
        return model, make_optimizer(model)

    def micro_step(self, last: bool):
        if self.cfg.grad_sync == "last":
            self._model.set_requires_gradient_sync(last)
        return super().micro_step(last)

    def full_state_dict(self, model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(model, options=options)
        return state if self.is_main else {}


def load_shards(model: torch.nn.Module, weights: Callable[[list[str]], ModelWeights], device: torch.device) -> None:
    """Give the sharded model, its parameters still on the meta device, its weights: each rank allocates its shards
    only and copies in its part of each tensor, read one at a time, so no rank ever holds the whole model. Buffers
    (rotary tables) were computed on CPU when the model was built; they move to the device, or are loaded where the
    checkpoint holds them."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    persistent = set(model.state_dict())  # (the state dict of a model on meta costs nothing)
    params = dict(model.named_parameters())  # a tied weight once
    source = weights(list(params))
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(source.get(name) if name in persistent and name in source.names else buffers[name])
        for name, param in model.named_parameters():
            full = source.get(name, param.shape)
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(shard)
