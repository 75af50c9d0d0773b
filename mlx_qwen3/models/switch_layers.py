"""Gathered-expert layers: each token runs through only the experts its router picked (as mlx-lm's)."""

import math

import mlx.core as mx
import mlx.nn as nn

from .base import swiglu


class SwitchLinear(nn.Module):
    """One linear layer per expert, stacked as weight (E, out, in); runs only the experts asked for."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(
            x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedSwitchLinear.from_float(self.weight, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    def __init__(self, weight, scales, biases, group_size: int, bits: int, mode: str):
        super().__init__()
        self.weight, self.scales = weight, scales
        if biases is not None:
            self.biases = biases
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.freeze()

    @classmethod
    def from_float(cls, weight: mx.array, group_size: int, bits: int, mode: str = "affine"):
        w, scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        return cls(w, scales, biases[0] if biases else None, group_size, bits, mode)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


class SwitchGLU(nn.Module):
    """The selected experts' SwiGLU MLPs, with gathered matmuls."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(dim, hidden_dim, num_experts)
        self.up_proj = SwitchLinear(dim, hidden_dim, num_experts)
        self.down_proj = SwitchLinear(hidden_dim, dim, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x (..., D), indices (..., k) -> (..., k, D)."""
        *lead, k = indices.shape
        x = mx.expand_dims(x, (-2, -3))  # (..., 1, 1, D): one row per token, broadcast over its k experts
        # With many tokens, sort the (token, expert) pairs by expert so each expert's weights are read once.
        do_sort = indices.size >= 64
        idx, inv_order = indices, None
        if do_sort:
            flat = indices.flatten()
            order = mx.argsort(flat)
            inv_order = mx.argsort(order)
            x, idx = x.flatten(0, -3)[order // k], flat[order]
        h = swiglu(self.gate_proj(x, idx, do_sort), self.up_proj(x, idx, do_sort))
        y = self.down_proj(h, idx, do_sort)
        if do_sort:
            y = mx.unflatten(y[inv_order], 0, indices.shape)
        return y.squeeze(-2)
