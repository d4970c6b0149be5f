"""Training FLOPs from the actual documents, for ``train/mfu`` and for balancing micro-batches over ranks.

Per token, the matmuls cost 6 N FLOPs forward and backward (N: parameters that multiply, the input embedding
excluded; PaLM, appendix B); a frozen matrix (LoRA's base) 4, its weight gradient never computed. Causal attention
adds, per layer and document of length n, 6 d n^2 (QK^T and AV, 2 n^2 d multiply-adds each, halved by causality,
times 3 for forward and backward) with d the query width: a packed row of short documents costs far less attention
than one long document of the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sftdist.model import parameter_numel

# Dense bf16 peak per GPU (TFLOP/s, no sparsity), from the vendors' data sheets; train.peak_tflops overrides.
_PEAK_BF16_TFLOPS = (
    ("GH200", 989.0),
    ("H200 NVL", 835.0),  # (before H200: the first name a GPU's contains is its)
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GB200", 2500.0),  # (per GPU: half a Grace-Blackwell superchip; before B200, a part of its name)
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("4090", 165.0),
)


@dataclass(frozen=True)
class ModelDims:
    matmul_params: int  # N
    layers: int
    width: int  # query width (heads x head dim), usually the hidden size
    frozen_params: int = 0  # of N, those without a gradient (forward and input gradient only)
    head_params: int = 0  # of N, the output head's (the chunked loss runs it on supervised positions only)
    head_frozen: bool = False

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelDims:
        config = model.config
        embed = model.get_input_embeddings().weight
        output = model.get_output_embeddings()
        tied = output is not None and output.weight is embed
        matmul = [p for p in model.parameters() if p is not embed or tied]
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        head = output.weight if output is not None else None
        return cls(
            sum(map(parameter_numel, matmul)),
            config.num_hidden_layers,
            heads * head_dim,
            sum(parameter_numel(p) for p in matmul if not p.requires_grad),
            parameter_numel(head) if head is not None else 0,
            head is not None and not head.requires_grad,
        )

    def flops(self, lengths: list[int], head_tokens: int | None = None) -> float:
        """Forward and backward FLOPs of training on documents of these lengths, the output head on ``head_tokens``
        positions (default: every token; the chunked loss runs it on the supervised ones only)."""
        head_frozen = self.head_params if self.head_frozen else 0
        per_token = 6 * (self.matmul_params - self.head_params) - 2 * (self.frozen_params - head_frozen)
        head = (4 if self.head_frozen else 6) * self.head_params
        tokens = sum(lengths) if head_tokens is None else head_tokens
        return float(sum(per_token * n + 6 * self.layers * self.width * n * n for n in lengths) + head * tokens)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """Per-device peak for MFU: the override, else a known GPU's dense bf16 peak, else None (no MFU)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16_TFLOPS if key in name), None)
