"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the dense model with sparse-expert MLPs."""

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from . import qwen3
from .. import kernels
from .base import MLP, Linear, swiglu


@dataclass(frozen=True, kw_only=True)
class ModelArgs(qwen3.ModelArgs):
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)

    def check(self):
        super().check()
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} is more than num_experts {self.num_experts}"
            )

    def is_sparse(self, layer_idx: int) -> bool:
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def sparse_layers(self) -> int:
        """How many layers is_sparse() picks, counted without a loop over the layers."""
        if not self.num_experts:
            return 0
        L, step = self.num_hidden_layers, self.decoder_sparse_step
        exempt = {i for i in self.mlp_only_layers if i < L and (i + 1) % step == 0}
        return L // step - len(exempt)

    def sparse_mlp_parameters(self) -> int:
        D = self.hidden_size
        return self.num_experts * D + 3 * self.num_experts * D * self.moe_intermediate_size


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


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts)

    def route(self, x: mx.array):
        """-> (expert indices, their weights), each (..., k); the softmax runs in float32 as in HF."""
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        inds = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
        scores = mx.take_along_axis(probs, inds, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return inds, scores.astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        inds, scores = self.route(x)
        return kernels.sparse_moe(self.switch_mlp, x, inds, scores)


class Model(qwen3.Model):
    def make_mlp(self, args: ModelArgs, layer_idx: int) -> nn.Module:
        if args.is_sparse(layer_idx):
            return SparseMoeBlock(args)
        return MLP(args.hidden_size, args.intermediate_size)

    def sanitize(self, weights: dict) -> dict:
        """Stack the per-expert HF tensors into one (E, out, in) tensor per projection."""
        weights = super().sanitize(weights)
        E = self.args.num_experts
        for i, layer in enumerate(self.layers):
            if not isinstance(layer.mlp, SparseMoeBlock):
                continue
            prefix = f"model.layers.{i}.mlp"
            # transformers 5 in-memory layout: gate and up fused along the output dimension.
            fused = weights.pop(f"{prefix}.experts.gate_up_proj", None)
            if fused is not None:
                gate, up = mx.split(fused, 2, axis=1)
                weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate
                weights[f"{prefix}.switch_mlp.up_proj.weight"] = up
                weights[f"{prefix}.switch_mlp.down_proj.weight"] = weights.pop(f"{prefix}.experts.down_proj")
                continue
            for name in ("gate_proj", "up_proj", "down_proj"):
                keys = [f"{prefix}.experts.{e}.{name}.weight" for e in range(E)]
                if keys[0] in weights:
                    present = [weights.pop(k) for k in keys if k in weights]
                    if len(present) != E:
                        raise ValueError(f"layer {i} has {len(present)} of {E} experts' {name} weights")
                    weights[f"{prefix}.switch_mlp.{name}.weight"] = mx.stack(present)
        return weights

