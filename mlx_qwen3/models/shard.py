"""A loaded model's share for one rank of an mx.distributed group (distributed.py has the group).

Tensor parallel: each rank keeps 1/N of every attention block's heads and every MLP's hidden units (of
every expert's, or 1/N of the experts), and each block ends in one all_sum (`Summed`). Pipeline: each
rank keeps a contiguous range of layers; the hidden state goes rank to rank (`Pipelined`). Shard before
the weights are evaluated: each rank then reads only its share (one whole tensor at a time).
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import UserError
from .cache import Rows

PARALLEL = ("tensor", "pipeline", "none")
EXPERTS = ("split", "whole")


def check_parallel(parallel: str):
    if parallel not in PARALLEL:
        raise UserError(f"parallel={parallel!r} is not one of {', '.join(PARALLEL)}", "parallel")


def shard(model: nn.Module, g: mx.distributed.Group, parallel: str = "tensor", experts: str = "split"):
    """Keep only this rank's share of `model`'s weights (still lazy: call before evaluating them).

    Args:
        parallel: "tensor" (heads, hidden units and experts split; one all_sum per block) or "pipeline"
            (contiguous layer ranges balanced by weight bytes; the hidden state passed rank to rank).
        experts: for Qwen3-MoE in tensor parallel: "split" divides every expert's matrices across the
            ranks (each rank reads 1/N of each chosen expert: balanced whatever the router picks),
            "whole" gives each rank 1/N of the experts.
    """
    check_parallel(parallel)
    if experts not in EXPERTS:
        raise UserError(f"experts={experts!r} is not one of {', '.join(EXPERTS)}", "experts")
    if parallel == "none" or g is None or g.size() == 1:
        return model
    if parallel == "tensor":
        _check_tensor(model.args, g.size(), experts)
        for layer in model.layers:
            layer.self_attn = Summed(_shard_attention(layer.self_attn, g), g)
            layer.mlp = Summed(_shard_mlp(layer.mlp, g, experts), g)
    else:
        _pipeline(model, g)
    model.group = g
    return model


class Summed(nn.Module):
    """A block that computed this rank's share of its output; the ranks' shares summed: its one collective."""

    def __init__(self, block: nn.Module, g):
        super().__init__()
        self.block = block
        self.group = g

    def __call__(self, *args, **kwargs):
        return mx.distributed.all_sum(self.block(*args, **kwargs), group=self.group)


def _check_tensor(args, n: int, experts: str):
    heads, kv = args.num_attention_heads, args.num_key_value_heads
    hint = "run on a number of Macs that divides it, or use pipeline parallel (--pipeline)"
    if heads % n or (kv % n and n % kv):
        raise UserError(f"{n} ranks cannot share {heads} attention heads ({kv} key/value heads) evenly; {hint}")
    q = args.quantization or {}
    group_size = max([q.get("group_size", 1)] + [v["group_size"] for v in q.values() if isinstance(v, dict)])

    def check(name: str, size: int):
        if size % n or (size // n) % group_size:
            grouped = f" in whole quantization groups of {group_size}" if group_size > 1 else ""
            raise UserError(f"{n} ranks cannot split {name} {size} evenly{grouped}; {hint}")

    check("the attention width", heads * args.dims_per_head)
    if args.sparse_layers() < args.num_hidden_layers:
        check("intermediate_size", args.intermediate_size)
    if args.sparse_layers():
        if experts == "split":
            check("moe_intermediate_size", args.moe_intermediate_size)
        elif args.num_experts % n:
            raise UserError(f"{n} ranks cannot share {args.num_experts} experts evenly; {hint}")


def _shard_attention(attn: nn.Module, g) -> nn.Module:
    """This rank's q heads and the key/value heads they read: a 1/N share of the kv heads when N divides
    them, otherwise (more ranks than kv heads) the one kv head its q heads share, held by N / kv ranks."""
    r, n = g.rank(), g.size()
    kv = attn.n_kv_heads
    kv_part, kv_parts = (r, n) if kv % n == 0 else (r // (n // kv), kv)
    _take(attn.q_proj, r, n, axis="out")
    _take(attn.k_proj, kv_part, kv_parts, axis="out")
    _take(attn.v_proj, kv_part, kv_parts, axis="out")
    _take(attn.o_proj, r, n, axis="in")
    attn.n_heads //= n
    attn.n_kv_heads //= kv_parts
    return attn


def _shard_mlp(mlp: nn.Module, g, experts: str) -> nn.Module:
    """A dense MLP's or every expert's hidden units split (gate and up by rows, down by columns), or with
    experts="whole" this rank's 1/N of the experts."""
    r, n = g.rank(), g.size()
    projs = mlp.switch_mlp if "switch_mlp" in mlp else mlp
    if "switch_mlp" in mlp and experts == "whole":
        for proj in (projs.gate_proj, projs.up_proj, projs.down_proj):
            _take(proj, r, n, axis="experts")
        count = mlp.gate.weight.shape[0] // n  # the router's rows: every expert
        return LocalExperts(mlp, r * count, count)
    _take(projs.gate_proj, r, n, axis="out")
    _take(projs.up_proj, r, n, axis="out")
    _take(projs.down_proj, r, n, axis="in")
    return mlp


class LocalExperts(nn.Module):
    """A MoE block holding experts [first, first + count) only: the router still sees all of them, and
    the picks of other ranks' experts weigh 0 here (and point at a local expert, to keep shapes fixed)."""

    def __init__(self, block: nn.Module, first: int, count: int):
        super().__init__()
        self.block = block
        self.first, self.count = first, count

    def __call__(self, x: mx.array) -> mx.array:
        from .. import kernels

        inds, scores = self.block.route(x)
        mine = (inds >= self.first) & (inds < self.first + self.count)
        inds = mx.where(mine, inds - self.first, 0).astype(inds.dtype)
        scores = mx.where(mine, scores, mx.zeros_like(scores))
        return kernels.sparse_moe(self.block.switch_mlp, x, inds, scores)


def _take(layer: nn.Module, part: int, parts: int, axis: str):
    """Keep chunk `part` of `parts` equal chunks of a (quantized) linear or expert layer's weights along
    its outputs, its inputs (whole quantization groups) or its experts; copied, so that the whole
    tensor can be freed once this chunk is read."""
    quantized = "scales" in layer
    w = layer.weight
    if axis == "experts":
        dims = {name: 0 for name in ("weight", "scales", "biases", "bias")}
    elif axis == "out":
        dims = {"weight": w.ndim - 2, "scales": w.ndim - 2, "biases": w.ndim - 2, "bias": -1}
    else:
        dims = {"weight": -1, "scales": -1, "biases": -1}
    for name, dim in dims.items():
        if name not in layer or (name == "biases" and not quantized):
            continue
        a = layer[name]
        size = a.shape[dim] // parts
        index = [slice(None)] * a.ndim
        index[dim] = slice(part * size, (part + 1) * size)
        layer[name] = mx.contiguous(a[tuple(index)])
    if axis == "in" and "bias" in layer and part:  # the output is summed over ranks: one rank adds the bias
        layer["bias"] = mx.zeros_like(layer["bias"])


# ---- pipeline ----

def _pipeline(model: nn.Module, g):
    """Keep this rank's contiguous range of layers (rank 0 the first), balanced by weight bytes."""
    r, n = g.rank(), g.size()
    layers = model.model.layers
    if len(layers) < n:
        raise UserError(f"{n} ranks cannot share {len(layers)} layers; use fewer Macs")
    sizes = [sum(v.nbytes for _, v in tree_flatten(layer.parameters())) for layer in layers]
    bounds = balance(sizes, n)
    model.model.layers = layers[bounds[r]:bounds[r + 1]]
    model.model = Pipelined(model.model, g)


def balance(sizes: list, n: int) -> list:
    """Boundaries [0, b1, ..., len(sizes)] of n contiguous non-empty ranges with the largest range's
    total as small as it can be (binary search on that total; greedy fill checks each candidate)."""
    def fits(limit):
        count, total = 1, 0
        for s in sizes:
            if total + s > limit:
                count, total = count + 1, 0
            total += s
        return count <= n

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    bounds, total = [0], 0
    for i, s in enumerate(sizes):
        # a new range when this one is full, or when the ranges left need the layers left one each
        if i and (total + s > lo or len(sizes) - i < n - len(bounds) + 1):
            bounds.append(i)
            total = 0
        total += s
    bounds.append(len(sizes))
    return bounds


class Pipelined(nn.Module):
    """A Qwen3Model holding only its rank's layers: takes the hidden state from the rank before it, gives
    its own to the next, and every rank gets the last rank's (one all_sum, the others adding zeros)."""

    def __init__(self, stage: nn.Module, g):
        super().__init__()
        self.stage = stage
        self.group = g

    @property
    def layers(self):
        return self.stage.layers

    @property
    def embed_tokens(self):
        return self.stage.embed_tokens

    def __call__(self, ids: mx.array, cache=None) -> mx.array:
        r, n, g = self.group.rank(), self.group.size(), self.group
        h = self.stage.embed_tokens(ids)
        if r > 0:
            h = mx.distributed.recv_like(h, r - 1, group=g)
        cache = cache or [None] * len(self.layers)
        mask = "causal" if h.shape[1] > 1 else None
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        if r < n - 1:
            sent = mx.distributed.send(h, r + 1, group=g)
            last = cache[-1].caches[0] if isinstance(cache[-1], Rows) else cache[-1]
            if last is not None:  # evaluating the cache (a prompt chunk) must send too
                last.keys = mx.depends(last.keys, sent)
            h = mx.depends(mx.zeros_like(h), sent)
        return self.stage.norm(mx.distributed.all_sum(h, group=g))
