"""The custom Metal kernels' Python side: build, self-check, measured dispatch, and the plain-MLX twins.

Each op has a twin made of MLX built-ins that is both its reference and its fallback. On Metal, in
auto mode, the first use of a kernel at a shape checks it against the twin through the production
launch, times both at the real shape, and keeps the custom kernel only where it is faster; the
choice is stored per machine and version (kernel_choices.py). A compile error, a mismatch or a launch
that raises logs one warning and that kernel is not used again in this process. Off Metal, the
twins run. load(..., kernels=...) (set_mode) forces either path for one model, MLX_QWEN3_KERNELS=custom|builtin
for every model that sets none.
"""

import logging
import os
import statistics
import time
from functools import cached_property
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .kernel_choices import ChoiceStore, cache_folder, error_line, machine

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


# ---- dispatch: which path runs, decided once per shape on this machine ----
#
# On Metal, in auto mode, the first use of an op at a shape (1) checks the kernel against its twin
# through the very launch production makes (same kernel name, template arguments, k, dtypes and
# buffer kinds; a small N), then (2) times both at the real shape with the layer's own weights and
# keeps the faster: the custom kernel only where it is measurably faster. Choices are stored per
# chip, macOS, MLX, package and kernel sources (ChoiceStore), so later runs skip the timing.

MARGIN = 0.03  # the custom kernel must beat MLX's built-in by this fraction to be chosen
ALIGN = 16  # bytes: the kernels load packed weights as uint2 (4-bit) / uint4 (8-bit)

# What this process has learnt, per machine and not per model (the documented caches; forget()):
_disabled = {}  # kernel name -> why it is off for the rest of this process
_choices = {}  # shape key (a tuple, see describe) -> {"custom_us", "builtin_us", "custom"} for this process
_store = None  # the ChoiceStore, read on first use
_said = set()  # one-time messages already logged (mode() and aligned() run once per layer and token)


def forget():
    """Forget what this process has learnt: the choices, the disabled kernels, the one-time
    messages and the store (read again on next use, from the cache folder of that moment)."""
    global _store
    for cache in (_disabled, _choices, _said):
        cache.clear()
    _store = None


def disabled() -> dict:
    """The kernels turned off in this process: name -> why."""
    return dict(_disabled)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def set_mode(model: nn.Module, mode):
    """The kernel mode of this model (or layer) and its layers only; None: MLX_QWEN3_KERNELS, else
    auto. auto: on Metal, the custom kernel where its self-check passes and it measures faster than
    MLX's built-in; custom: always (on Metal), unchecked; builtin: never."""
    if mode is not None:
        check_mode(mode)
    for _, module in model.named_modules():
        object.__setattr__(module, "_kernel_mode", mode)  # not a parameter: kept out of the module's dict


def mode(layer=None) -> str:
    """The mode a layer runs in: its model's (set_mode), else MLX_QWEN3_KERNELS, else auto."""
    m = (layer.__dict__.get("_kernel_mode") if layer is not None else None) or os.environ.get("MLX_QWEN3_KERNELS", "auto")
    if m not in MODES:
        if f"env {m}" not in _said:
            log.warning("MLX_QWEN3_KERNELS=%s is not one of %s; using auto", m, ", ".join(MODES))
            _said.add(f"env {m}")
        m = "auto"
    return m


def on_metal() -> bool:
    return mx.metal.is_available()


def _disable(name: str, why: str):
    if name not in _disabled:
        log.warning("custom kernel %s %s; using MLX's built-ins for it from now on", name, why)
        _disabled[name] = why


def describe(key: tuple) -> str:
    """A shape key as the choice file and selftest name it: 'qmv bfloat16 4-bit/64 4096x2560'."""
    name, dtype, *rest = key
    dtype = str(dtype).split(".")[-1]
    if name == "qmv":
        bits, gs, N, K = rest
        return f"qmv {dtype} {bits}-bit/{gs} {N}x{K}"
    gate_bits, gate_gs, down_bits, down_gs, k, E, D, I = rest
    return f"moe {dtype} {gate_bits}-bit/{gate_gs} {down_bits}-bit/{down_gs} {k} of {E} experts {D}->{I}->{D}"


def _use(m: str, key: tuple, check, timed) -> bool:
    """Whether to run the custom kernel key[0] at shape `key`: the mode m, the platform, its
    self-check (a zero-argument function returning None or what is wrong) and the measured choice
    (`timed` gives zero-argument (custom, builtin) calls at the real shape). Keys are tuples, cheap
    to build on every call; the text is made only when a shape is first seen."""
    name = key[0]
    if m == "builtin" or not on_metal():
        return False
    if m == "custom":
        return True
    if name in _disabled:
        return False
    choice = _choices.get(key)
    if choice is None:
        text = describe(key)
        choice = store().get(text)  # measured by an earlier run on this machine and version
        if choice is None or choice["custom"]:  # a kernel about to run is checked in every process
            try:
                err = check()
            except Exception as e:  # a compile error, a launch the device refuses, ...
                err = error_line(e)
            if err is not None:
                _disable(name, f"failed its self-check at {text} ({err})")
                return False
        if choice is None:
            try:
                choice = measure(*timed())
            except Exception as e:  # the real shape fails where the small check did not
                _disable(name, f"failed at {text} while being timed ({error_line(e)})")
                return False
            store().put(text, choice)
            log.info("kernel choice at %s: %s (custom %.1f us, built-in %.1f us)", text,
                     "custom" if choice["custom"] else "built-in", choice["custom_us"], choice["builtin_us"])
        _choices[key] = choice
    return choice["custom"]


def _run(m: str, name: str, custom, twin, *args):
    """custom(*args), or the twin if the launch raises (in auto mode; forced custom lets it raise)."""
    try:
        return custom(*args)
    except Exception as e:
        if m == "custom":
            raise
        _disable(name, f"raised at launch ({error_line(e)})")
        return twin(*args)


def measure(custom, builtin, rounds: int = 5, reps: int = 10, clock=time.perf_counter) -> dict:
    """Median microseconds per call of each zero-argument op, and whether the custom one wins by
    MARGIN. `reps` calls are evaluated together so that the launch overhead is shared as in a
    forward pass; the two alternate so that a clock change or a busy GPU hits both alike."""
    def once(fn):
        tic = clock()
        mx.eval([fn() for _ in range(reps)])
        return (clock() - tic) / reps

    once(custom), once(builtin)  # compile and warm up
    c, b = zip(*[(once(custom), once(builtin)) for _ in range(rounds)])
    cu, bu = statistics.median(c) * 1e6, statistics.median(b) * 1e6
    return {"custom_us": round(cu, 2), "builtin_us": round(bu, 2), "custom": cu < bu * (1 - MARGIN)}


# ---- the stored choices (kernel_choices.py) ----

def store() -> ChoiceStore:
    global _store
    if _store is None:
        _store = ChoiceStore(cache_folder(), machine(SOURCES))
    return _store


# ---- the checks and the layers ----

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


def address(a: mx.array) -> int:
    """Where an evaluated array's data starts (its buffer plus the offset of a view)."""
    return np.asarray(a).ctypes.data


def aligned(layer) -> bool:
    """Whether the layer's packed weight starts on an ALIGN boundary, as the kernels' vector loads
    need; a view into another array may not. Worked out once per weight array (it is per call)."""
    w = layer.weight
    seen = layer.__dict__.get("_kernel_aligned")
    if seen is None or seen[0] is not w:
        seen = (w, address(w) % ALIGN == 0)
        object.__setattr__(layer, "_kernel_aligned", seen)  # not a parameter: kept out of the module's dict
        if not seen[1] and "unaligned" not in _said:
            log.info("a quantized weight is not %d-byte aligned (a view into another array): MLX's built-ins "
                     "run for such layers", ALIGN)
            _said.add("unaligned")
    return seen[1]


def _eligible(dtype, layer) -> bool:
    """Whether a custom kernel can take this layer here (alignment looked at only on Metal: off it
    the built-ins run whatever the answer, and MLX's CPU buffers are not 16-byte aligned)."""
    return (dtype in (mx.float16, mx.bfloat16) and layer.mode == "affine" and layer.bits in (4, 8)
            and layer.group_size in (32, 64, 128) and on_metal() and aligned(layer))


def quantized_linear(layer, x: mx.array) -> mx.array:
    """A QuantizedLinear's forward: the custom mat-vec for one token where it is chosen, MLX's
    quantized_matmul otherwise."""
    K = x.shape[-1]
    if x.size == K and _eligible(x.dtype, layer):
        args = (layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)

        def check():  # the production launch at N = 8
            k1, k2 = mx.random.split(mx.random.key(0))
            small = random_quantized((8, K), x.dtype, layer.group_size, layer.bits, k1)
            xs = mx.random.normal((K,), key=k2).astype(x.dtype)
            return _mismatch(qmv_custom(xs, *small), qmv_twin(*float32(xs, *small)))

        def timed():
            xs = mx.random.normal((K,), key=mx.random.key(1)).astype(x.dtype)
            return lambda: qmv_custom(xs, *args), lambda: qmv_twin(xs, *args)

        m = mode(layer)
        if _use(m, ("qmv", x.dtype, layer.bits, layer.group_size, layer.weight.shape[0], K), check, timed):
            y = _run(m, "qmv", qmv_custom, qmv_twin, x.reshape(K), *args)
        else:
            y = qmv_twin(x.reshape(K), *args)
        y = y.reshape(*x.shape[:-1], -1)
        return y + layer.bias if "bias" in layer else y
    y = mx.quantized_matmul(x, layer.weight, layer.scales, layer.get("biases"), transpose=True,
                            group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    return y + layer.bias if "bias" in layer else y


def sparse_moe(switch_mlp, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
    """The weighted sum of the selected experts' SwiGLU MLPs: two fused kernels for one token on
    quantized experts where they are chosen, else the gathered matmuls (sorted by expert for many
    tokens)."""
    projs = [switch_mlp.gate_proj, switch_mlp.up_proj, switch_mlp.down_proj]
    D = x.shape[-1]
    if x.size == D and all("scales" in p and _eligible(x.dtype, p) for p in projs):
        gate, up, down = [(p.weight, p.scales, p.biases, p.group_size, p.bits) for p in projs]
        E, I = gate[0].shape[:2]
        k = inds.shape[-1]

        def check():  # the production launch (the same k) with 4 experts, a repeated one among them
            keys = mx.random.split(mx.random.key(0), 6)
            sg = random_quantized((4, I, D), x.dtype, gate[3], gate[4], keys[0])
            su = random_quantized((4, I, D), x.dtype, up[3], up[4], keys[1])
            sd = random_quantized((4, D, I), x.dtype, down[3], down[4], keys[2])
            xs = mx.random.normal((D,), key=keys[3]).astype(x.dtype)
            ids = mx.array([(3 * j + 1) % 4 for j in range(k)], dtype=mx.uint32)
            sc = mx.softmax(mx.random.normal((k,), key=keys[4])).astype(x.dtype)
            return _mismatch(moe_custom(xs, ids, sc, sg, su, sd), moe_twin(*float32(xs, ids, sc, sg, su, sd)))

        def timed():
            keys = mx.random.split(mx.random.key(1), 3)
            xs = mx.random.normal((D,), key=keys[0]).astype(x.dtype)
            ids = mx.random.permutation(E, key=keys[1])[:k].astype(mx.uint32)
            sc = mx.softmax(mx.random.normal((k,), key=keys[2])).astype(x.dtype)
            return (lambda: moe_custom(xs, ids, sc, gate, up, down), lambda: moe_twin(xs, ids, sc, gate, up, down))

        key = ("moe", x.dtype, gate[4], gate[3], down[4], down[3], k, E, D, I)
        args = (x.reshape(D), inds.reshape(k).astype(mx.uint32), scores.reshape(k), gate, up, down)
        m = mode(switch_mlp)
        y = _run(m, "moe", moe_custom, moe_twin, *args) if _use(m, key, check, timed) else moe_twin(*args)
        return y.reshape(x.shape)
    y = switch_mlp(x, inds)
    return (y * scores[..., None]).sum(axis=-2)
