"""``strategy=zero3``: DeepSpeed ZeRO stage 3. The only module that imports deepspeed.

The DeepSpeed config is generated from ours (precision, clipping, the strategy.* keys) and
``strategy.deepspeed_config`` (a JSON file) is merged on top. Gradient accumulation is ours, not DeepSpeed's:
the number of micro-batches in a step follows from the data, so DeepSpeed is told one micro-step per step
(``gradient_accumulation_steps: 1``, which also means its ``backward`` never rescales the loss) and the step's
boundary is set by hand before each micro-batch. ZeRO averages gradients over the ranks; ``grad_divisor``
says so, and sftdist.training.loss compensates.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sftdist.config import StrategyConfig
from sftdist.errors import ConfigError
from sftdist.parallel.dist import DistributedStrategy

FORMAT = "deepspeed"
_TAG = "zero3"  # the one DeepSpeed tag under a checkpoint's state/ directory
_PARTITION_OWNER = re.compile(r"zero_pp_rank_(\d+)_")
# Derived from train.* (or owned by the loop): a user JSON may not set them.
_OURS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "gradient_clipping",
    "fp16",
    "bf16",
    "torch_autocast",
    "communication_data_type",
    "data_types",
    "managed_gradient_accumulation",
    "prescale_gradients",
    "gradient_predivide_factor",
)


def _import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as err:
        raise ConfigError(
            f"strategy=zero3 needs DeepSpeed, which does not import here ({err}); install it with "
            "pip install 'sftdist[deepspeed]', or use strategy=fsdp2"
        ) from err
    return deepspeed


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: StrategyConfig, precision: str, max_grad_norm: float) -> dict:
    """The DeepSpeed config a run uses: generated, then ``cfg.deepspeed_config`` merged on top."""
    zero: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": cfg.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": cfg.reduce_bucket_size,
        "stage3_prefetch_bucket_size": cfg.prefetch_bucket_size,
        "stage3_param_persistence_threshold": cfg.param_persistence_threshold,
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: micro-batches are ours (token-budgeted)
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        # The engine's forward runs under its own autocast setting: without this section it turns off the autocast
        # sftdist's step opens around it (on CUDA; on CPU it does not see it), and the model computes in pure bf16
        # where the other strategies compute under bf16 autocast (fp32 softmax, norms and loss)
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
        # Reduce and accumulate gradients in fp32 whatever the compute dtype (as fsdp2 does): DeepSpeed's
        # defaults would do both in bf16, losing precision with every micro-batch of a step.
        "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # our torch AdamW, also with the optimizer offloaded
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed_config is None:
        return config
    path = Path(cfg.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"strategy.deepspeed_config={cfg.deepspeed_config!r}: no such file")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"strategy.deepspeed_config={cfg.deepspeed_config!r}: not valid JSON ({err})") from err
    if not isinstance(user, dict):
        raise ConfigError(f"strategy.deepspeed_config={cfg.deepspeed_config!r}: must hold a JSON object")
    clash = [k for k in _OURS if k in user]
    if clash:
        raise ConfigError(
            f"strategy.deepspeed_config={cfg.deepspeed_config!r} sets {', '.join(clash)}, which "
            "sftdist derives (train.global_batch_size, train.micro_batch_tokens, train.lr, "
            "train.max_grad_norm, precision): remove them from the file"
        )
    stage = user.get("zero_optimization", {}).get("stage", 3)
    if stage != 3:
        raise ConfigError(
            f"strategy.deepspeed_config={cfg.deepspeed_config!r} sets zero_optimization.stage="
            f"{stage}; strategy=zero3 is stage 3"
        )
    return _merge(config, user)


class ZeRO3Strategy(DistributedStrategy):
    def __init__(self, cfg: StrategyConfig, device: str, precision: str, max_grad_norm: float):
        self.ds = _import_deepspeed()
        if device == "cpu" and torch.cuda.is_available():
            raise ConfigError(
                "strategy=zero3 with device=cpu on a machine with CUDA: DeepSpeed places the model "
                "on the GPU regardless; use device=auto (or hide the GPUs: CUDA_VISIBLE_DEVICES=)"
            )
        self.config = deepspeed_config(cfg, precision, max_grad_norm)
        super().__init__("zero3", device, cfg.timeout_minutes, cfg.context_parallel)
        import logging

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if self.device.type == "cpu":
            # DeepSpeed's CPU backend compiles a shared-memory all-reduce at start (~45 s of C++ on a fresh machine,
            # again whenever another install's sources are used) that only its inference path calls: not built
            self.ds.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.ds.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        self._engine: Any = None

    loads_weights = True  # partitioned as it is built (zero.Init), then loaded one gathered parameter at a time

    def constructing(self):
        # zero.Init patches torch.Tensor.__new__ while it is open; torch._dynamo (imported by transformers' modeling
        # code) refuses to be imported for the first time under that patch, so both are imported before it.
        import torch._dynamo  # noqa: F401
        import transformers.modeling_utils  # noqa: F401

        return self.ds.zero.Init(
            config_dict_or_path=self.config, remote_device="cpu" if self.device.type == "cpu" else None
        )

    def setup(
        self,
        model: torch.nn.Module,
        make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
        weights: Callable[[list[str]], Any] | None = None,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        self._load(model, weights)
        engine, optimizer, _, _ = self.ds.initialize(
            model=model, optimizer=make_optimizer(model), config=self.config, dist_init_required=False
        )
        self._engine = engine
        return engine, optimizer

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model)

    def _load(self, model: torch.nn.Module, weights: Callable[[list[str]], Any]) -> None:
        """Each parameter gathered in turn, rank 0 copies the checkpoint's tensor in, and it is partitioned again on
        leaving (DeepSpeed broadcasts rank 0's values): one whole parameter at a time on any rank."""
        params = dict(model.named_parameters())  # a tied weight once
        source = weights(list(params))  # (safetensors: opened, not read; only rank 0 reads the parameters)
        for name, param in params.items():
            with self.ds.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
                if self.is_main:
                    param.copy_(source.get(name, param.shape))
        persistent = set(model.state_dict())
        with torch.no_grad():  # buffers are whole on every rank: computed when built, or loaded where saved
            for name, buffer in model.named_buffers():
                if name in persistent and name in source.names:
                    buffer.copy_(source.get(name))

    def micro_step(self, last: bool):
        self._engine.set_gradient_accumulation_boundary(last)
        return super().micro_step(last)

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss, scale_wrt_gas=False)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float, loss_finite: bool = True) -> float:
        # Clips to gradient_clipping (= max_grad_norm), steps, zeroes; a step whose gradient norm is not finite it
        # leaves out itself, clearing its gradients (ZeRO-3's overflow check, in every precision)
        self._engine.step()
        norm = self._engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if not loss_finite and self._engine.was_step_applied():  # (a finite gradient of a non-finite loss)
            raise FloatingPointError(
                f"the loss is not finite but its gradient norm is ({norm:.3g}): ZeRO-3 has applied that step; "
                "lower train.lr, or check the data and precision"
            )
        return norm

    def full_state_dict(self, model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The fp32 master weights (not the bf16 compute copies), gathered on every rank (a collective); a frozen
        parameter (no master: LoRA's base) as it is held."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.unwrap(model)
        keys = set(module.state_dict().keys())
        state: dict[str, torch.Tensor] = {}
        for name, param in module.named_parameters():  # a tied weight once; from_pretrained re-ties it
            if param.requires_grad:
                full = safe_get_full_fp32_param(param).reshape(param.ds_shape)
            elif trainable_only:
                continue
            else:
                with self.ds.zero.GatheredParameters([param]):
                    full = param.detach().float().clone()
            if self.is_main:
                state[name] = full.detach().cpu().clone()
        if not self.is_main or trainable_only:
            return state
        state.update({k: b.detach().cpu() for k, b in module.named_buffers() if k in keys})
        return {k: v for k, v in state.items() if k in keys}

    # Checkpoints in DeepSpeed's own format: each rank's partition of the fp32 masters and optimizer state. They load
    # on the same number of processes only (DeepSpeed refuses another); sftdist.run.identity says so at start.
    checkpoint_format = FORMAT
    reshards = False

    def save_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> list[Path]:
        self._engine.save_checkpoint(str(directory), tag=_TAG, save_latest=False, exclude_frozen_parameters=True)
        # DeepSpeed does not fsync: each rank's partitions are in its [bf16_]zero_pp_rank_<rank>_* files, and rank 0
        # writes the rest (DeepSpeed's conversion scripts).
        owners = {p: _PARTITION_OWNER.search(p.name) for p in directory.rglob("*") if p.is_file()}
        return [p for p, m in owners.items() if (int(m.group(1)) if m else 0) == self.rank]

    def load_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        with weights_only_loads():
            path, _ = self._engine.load_checkpoint(
                str(directory),
                tag=_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
                load_module_strict=all(p.requires_grad for p in model.parameters()),  # (no frozen base saved)
            )
        if path is None:  # DeepSpeed returns (None, ...) rather than raising when it finds nothing to load
            raise ValueError(f"DeepSpeed found no checkpoint under {directory}/{_TAG}")


def _safe_globals() -> list[Any]:
    """The bookkeeping classes DeepSpeed pickles into its checkpoints: plain data, allowed by name."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside the block (DeepSpeed's own included, which ask for ``weights_only=False``) loads
    with ``weights_only=True``: tensors and plain data only, never code, allowing :func:`_safe_globals` by name."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def full_model_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The consolidated fp32 weights of a zero3 checkpoint (those that trained: LoRA's adapters, or all), on CPU,
    without a process group."""
    _import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=_TAG, exclude_frozen_parameters=True))
