"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the dense model with sparse-expert MLPs."""

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from . import qwen3
from .. import kernels
from .base import MLP, Linear
from .switch_layers import SwitchGLU


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

