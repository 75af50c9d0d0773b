"""The custom Metal kernels' Python side: build, self-check, dispatch, and the plain-MLX twins.

Each op has a twin made of MLX built-ins that is both its reference and its fallback. On Metal the
first use of a kernel at a shape checks it against the twin on a small input; a compile error or
a mismatch logs one warning and that kernel is not used again in this process. Off Metal, the
twins run. MLX_QWEN3_KERNELS=custom|builtin (or load(..., kernels=...)) forces either path.
"""

import logging
import os
from functools import cached_property
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parents[1] / "metal_kernels"
MODES = ("auto", "custom", "builtin")
# The launch shape, in one place: the .metal sources get these as template arguments.
SIMD = 32  # lanes per simdgroup on Apple GPUs
SIMDGROUPS = 2  # simdgroups per threadgroup in qmv and moe_gate_up
ROWS = 4  # output rows per simdgroup in qmv and moe_gate_up
DOWN_ROWS = 4  # output rows per threadgroup in moe_down (whose threadgroup is one simdgroup per expert)
MAX_THREADS = 1024  # per threadgroup on Apple GPUs: moe_down takes k <= MAX_THREADS // SIMD


class Kernel:
    """metal_kernels/NAME.metal (with the shared quantized.metal header), compiled on first use."""

    def __init__(self, name: str, inputs: list, outputs: list):
        self.name, self.inputs, self.outputs = name, inputs, outputs

    @cached_property
    def fn(self):
        return mx.fast.metal_kernel(
            name=f"mlx_qwen3_{self.name}",
            input_names=self.inputs,
            output_names=self.outputs,
            source=(SOURCES / f"{self.name}.metal").read_text(),
            header=(SOURCES / "quantized.metal").read_text(),
        )

    def __call__(self, inputs, template, launch_shape, output_shapes, output_dtypes):
        grid, threadgroup = launch_shape
        return launch(self, inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                      output_shapes=output_shapes, output_dtypes=output_dtypes)


def launch(kernel: Kernel, **kwargs) -> list:
    """Run a kernel on the GPU. (The tests put a CPU executor of the same Metal source here.)"""
    return kernel.fn(**kwargs)


QMV = Kernel("qmv", ["x", "w", "scales", "biases"], ["y"])
MOE_GATE_UP = Kernel("moe_gate_up", ["x", "ids", "gate_w", "gate_s", "gate_b", "up_w", "up_s", "up_b"], ["h", "bad"])
MOE_DOWN = Kernel("moe_down", ["h", "ids", "scores", "w", "s", "b"], ["y"])


# ---- the ops: custom kernel and plain-MLX twin ----

def _template(dtype, bits, group_size, k=None):
    """The template arguments: qmv and moe_gate_up (k None) or moe_down (k experts)."""
    shape = [("SG", SIMDGROUPS), ("ROWS", ROWS)] if k is None else [("KE", k), ("R", DOWN_ROWS)]
    return [("T", dtype), ("BITS", bits), ("GS", group_size), ("SIMD", SIMD), *shape]


def _grid(rows: int, y: int = 1, k=None):
    """(grid, threadgroup) for `rows` output rows (times y): qmv and moe_gate_up (k None), moe_down."""
    simdgroups, per_threadgroup = (SIMDGROUPS, SIMDGROUPS * ROWS) if k is None else (k, DOWN_ROWS)
    threads = simdgroups * SIMD
    return ((rows + per_threadgroup - 1) // per_threadgroup * threads, y, 1), (threads, 1, 1)


def qmv_custom(x, w, scales, biases, group_size, bits):
    """x (K,) -> (N,)"""
    N = w.shape[0]
    return QMV([x, w, scales, biases], _template(x.dtype, bits, group_size), _grid(N), [(N,)], [x.dtype])[0]


def qmv_twin(x, w, scales, biases, group_size, bits):
    return mx.quantized_matmul(x[None], w, scales, biases, transpose=True, group_size=group_size, bits=bits)[0]


def moe_gate_up(x, ids, gate, up):
    """silu(gate x) * (up x) for the k selected experts: x (D,), ids (k,) uint32 -> h (k, I), and bad
    (1,) uint32, the number of ids past the last expert (each read as the last expert)."""
    (gw, gs_, gb, group_size, bits), (uw, us, ub, _, _) = gate, up
    k, I = ids.shape[0], gw.shape[1]
    return MOE_GATE_UP([x, ids, gw, gs_, gb, uw, us, ub], _template(x.dtype, bits, group_size), _grid(I, k),
                       [(k, I), (1,)], [x.dtype, mx.uint32])


def moe_down(h, ids, scores, down):
    """sum_j scores[j] * (down[ids[j]] h[j]): h (k, I), ids (k,) uint32, scores (k,) -> (D,)"""
    dw, ds, db, group_size, bits = down
    k, D = ids.shape[0], dw.shape[1]
    if not 0 < k <= MAX_THREADS // SIMD or h.shape[0] != k or scores.shape[0] != k:
        raise ValueError(f"moe_down takes 1 to {MAX_THREADS // SIMD} experts, as many as h's rows and scores; "
                         f"got ids {ids.shape}, h {h.shape}, scores {scores.shape}")
    return MOE_DOWN([h, ids, scores, dw, ds, db], _template(h.dtype, bits, group_size, k), _grid(D, k=k),
                    [(D,)], [h.dtype])[0]


def moe_custom(x, ids, scores, gate, up, down):
    """One token through its k experts: x (D,), ids (k,), scores (k,) -> (D,). gate/up/down are
    (weight, scales, biases, group_size, bits) of the stacked (E, out, in) expert projections."""
    h, _ = moe_gate_up(x, ids, gate, up)
    return moe_down(h, ids, scores, down)


def moe_twin(x, ids, scores, gate, up, down):
    def gathered(inp, proj):
        w, s, b, group_size, bits = proj
        return mx.gather_qmm(inp, w, s, b, rhs_indices=ids, transpose=True, group_size=group_size, bits=bits)

    x = x[None, None]  # (1, 1, D): one row, broadcast over the k experts
    h = nn.silu(gathered(x, gate)) * gathered(x, up)  # (k, 1, I)
    y = gathered(h, down)[:, 0, :]  # (k, D)
    return (y * scores[:, None]).sum(axis=0)


# ---- dispatch ----

_mode = None
_disabled = set()  # kernels that failed their self-check
_checked = set()  # (kernel, shape key) pairs that passed


def set_mode(mode: str):
    """auto: custom kernels on Metal after a self-check; custom: always (on Metal); builtin: never."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {', '.join(MODES)}, not {mode!r}")
    _mode = mode


_bad_env = set()  # values of MLX_QWEN3_KERNELS already warned about (mode() runs once per layer)


def mode() -> str:
    m = _mode or os.environ.get("MLX_QWEN3_KERNELS", "auto")
    if m not in MODES:
        if m not in _bad_env:
            log.warning("MLX_QWEN3_KERNELS=%s is not one of %s; using auto", m, ", ".join(MODES))
            _bad_env.add(m)
        m = "auto"
    return m


def on_metal() -> bool:
    return mx.metal.is_available()


def _use(name: str, key: tuple, check) -> bool:
    """Whether to run kernel `name` at shape `key`: the mode, the platform, and its self-check."""
    m = mode()
    if m == "builtin" or not on_metal():
        return False
    if m == "custom":
        return True
    if name in _disabled:
        return False
    if (name, key) not in _checked:
        try:
            err = check()
        except Exception as e:  # a compile error, or anything else the kernel throws
            err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if err is not None:
            log.warning("custom kernel %s failed its self-check at %s (%s); using MLX's built-ins", name, key, err)
            _disabled.add(name)
            return False
        _checked.add((name, key))
    return True


def float32(*args):
    """The same arguments with every floating array in float32: the twins then make an exact-enough
    yardstick on any device (MLX's CPU kernels accumulate half-precision inputs in half precision)."""
    def up(a):
        if isinstance(a, tuple):
            return tuple(up(v) for v in a)
        return a.astype(mx.float32) if isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating) else a

    return [up(a) for a in args]


def _mismatch(got: mx.array, want: mx.array, tol: float = 1e-2):
    got, want = got.astype(mx.float32), want.astype(mx.float32)
    err = (mx.abs(got - want).max() / (mx.abs(want).max() + 1e-6)).item()
    return None if err <= tol else f"relative error {err:.3g}"


def random_quantized(shape, dtype, group_size, bits, key):
    """Random weights scaled as trained ones are, quantized: (weight, scales, biases, group_size, bits)."""
    w = (mx.random.normal(shape, key=key) / shape[-1] ** 0.5).astype(dtype)
    return (*mx.quantize(w, group_size, bits), group_size, bits)


def _eligible(dtype, mode_, group_size, bits) -> bool:
    return dtype in (mx.float16, mx.bfloat16) and mode_ == "affine" and bits in (4, 8) and group_size in (32, 64, 128)


def quantized_linear(layer, x: mx.array) -> mx.array:
    """A QuantizedLinear's forward: the custom mat-vec for one token, MLX's quantized_matmul otherwise."""
    K = x.shape[-1]
    if x.size == K and _eligible(x.dtype, layer.mode, layer.group_size, layer.bits):
        def check():
            k1, k2 = mx.random.split(mx.random.key(0))
            small = random_quantized((8, K), x.dtype, layer.group_size, layer.bits, k1)
            xs = mx.random.normal((K,), key=k2).astype(x.dtype)
            return _mismatch(qmv_custom(xs, *small), qmv_twin(*float32(xs, *small)))

        op = qmv_custom if _use("qmv", (str(x.dtype), layer.bits, layer.group_size, K), check) else qmv_twin
        y = op(x.reshape(K), layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
        y = y.reshape(*x.shape[:-1], -1)
        return y + layer.bias if "bias" in layer else y
    y = mx.quantized_matmul(x, layer.weight, layer.scales, layer.get("biases"), transpose=True,
                            group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    return y + layer.bias if "bias" in layer else y


def sparse_moe(switch_mlp, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
    """The weighted sum of the selected experts' SwiGLU MLPs: two fused kernels for one token on
    quantized experts, else the gathered matmuls (sorted by expert for many tokens)."""
    projs = [switch_mlp.gate_proj, switch_mlp.up_proj, switch_mlp.down_proj]
    D = x.shape[-1]
    if x.size == D and all("scales" in p and _eligible(x.dtype, p.mode, p.group_size, p.bits) for p in projs):
        gate, up, down = [(p.weight, p.scales, p.biases, p.group_size, p.bits) for p in projs]
        k = inds.shape[-1]

        def check():
            keys = mx.random.split(mx.random.key(0), 6)
            E, I = 4, gate[0].shape[1]
            sg = random_quantized((E, I, D), x.dtype, gate[3], gate[4], keys[0])
            su = random_quantized((E, I, D), x.dtype, up[3], up[4], keys[1])
            sd = random_quantized((E, D, I), x.dtype, down[3], down[4], keys[2])
            xs = mx.random.normal((D,), key=keys[3]).astype(x.dtype)
            ids = mx.array([1, 3, 3, 0][: min(k, 4)], dtype=mx.uint32)  # a repeated expert too
            sc = mx.softmax(mx.random.normal((ids.shape[0],), key=keys[4])).astype(x.dtype)
            return _mismatch(moe_custom(xs, ids, sc, sg, su, sd), moe_twin(*float32(xs, ids, sc, sg, su, sd)))

        key = (str(x.dtype), gate[4], gate[3], down[4], down[3], D, gate[0].shape[1])
        op = moe_custom if _use("moe", key, check) else moe_twin
        return op(x.reshape(D), inds.reshape(k).astype(mx.uint32), scores.reshape(k), gate, up, down).reshape(x.shape)
    y = switch_mlp(x, inds)
    return (y * scores[..., None]).sum(axis=-2)
