"""Weight-only int8 quantization of linear layers, gpt-fast style.

Each output channel keeps one scale; weights are stored as int8 and multiplied by
`aten._weight_int8pack_mm`, whose CPU kernel reads a quarter of the fp32 bytes
(half of bf16) per token: decoding one token is bound by reading weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightOnlyInt8Linear(nn.Module):
    """A frozen nn.Linear with int8 weights.

    With fp32 activations on a CPU where our kernel runs (`pipeline.kernels`), the weights are int8 in
    groups of 32 read by that kernel: torch's own int8 kernel takes a scalar loop for fp32 activations
    (5x slower than fp32 on AVX2). Otherwise one scale per output channel and `aten._weight_int8pack_mm`,
    which is vectorized for bf16 activations.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        weight = linear.weight.detach().float()
        self.grouped = dtype == torch.float32 and weight.device.type == "cpu" and _kernels_available()
        if self.grouped:
            from pipeline import kernels

            quantized, scales = kernels.quantize_q8(weight)
            self.register_buffer("weight", quantized)
            self.register_buffer("scales", scales)
        else:
            scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
            self.register_buffer("weight", (weight / scales[:, None]).round().clamp(-128, 127).to(torch.int8))
            self.register_buffer("scales", scales.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grouped:
            from pipeline import kernels

            out = kernels.q8_linear(x, self.weight, self.scales)
        elif x.device.type == "cpu":
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales).reshape(*x.shape[:-1], -1)
        else:  # the fused kernel is CPU/MPS only; dequantize on the fly elsewhere (torch.compile fuses it)
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return out if self.bias is None else out + self.bias


def _kernels_available() -> bool:
    try:
        from pipeline import kernels
    except ImportError:
        return False
    return kernels.available()


def quantize_int8(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every nn.Linear of `model` (lm_head included) in place; returns how many were replaced."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, WeightOnlyInt8Linear(module, dtype))
    return len(targets)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights read per decoded token: every parameter and buffer but the embedding table.

    The embedding is a lookup (one row per token); a tied lm_head reads the same table in full,
    so it is counted once through the lm_head when the head is not quantized separately.
    """
    embedding = model.get_input_embeddings().weight
    total = 0
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen or tensor.data_ptr() == embedding.data_ptr():
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.weight.data_ptr() == embedding.data_ptr():
        total += embedding.numel() * embedding.element_size()
    return total
