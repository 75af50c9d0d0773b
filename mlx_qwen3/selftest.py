"""python -m mlx_qwen3.selftest [--model M]: check each custom kernel against its twin and time both.

Prints one JSON report to paste into a bug report: per op, whether the kernel agrees with MLX's
built-ins, how fast each is and which the dispatcher would choose; with --model, whole-model decode
tok/s with the built-ins and with `auto`; and the choices the dispatcher has stored on this machine.
"""

import platform
import statistics
import time

import mlx.core as mx

from . import kernels
from .kernel_choices import error_line

# model -> its hidden size D, MoE expert FFN I, experts E, experts per token k, dense (N, K) layers
DEFAULT_SHAPES = {
    "Qwen3-30B-A3B": dict(D=2048, I=768, E=128, k=8, dense=[(4096, 2048), (512, 2048), (2048, 4096)]),
    "Qwen3-4B": dict(D=2560, I=None, E=None, k=None, dense=[(4096, 2560), (9728, 2560), (2560, 9728)]),
}


def _time(fn, iters: int) -> float:
    """Median seconds of one call, evaluated."""
    mx.eval(fn())
    times = []
    for _ in range(iters):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def _compare(name, shape, custom, twin, args, iters, metal, nbytes) -> dict:
    """Check custom(*args) against the twin run in float32, then time both as the dispatcher does
    when it chooses (kernels.measure). `nbytes`: what the op must read (weights of the rows used,
    scales, biases, x), for the achieved GB/s."""
    row = {"op": name, "shape": shape, "bytes": nbytes}
    if not metal:
        row["builtin_us"] = round(_time(lambda: twin(*args), iters) * 1e6, 1)
        row["builtin_gbs"] = round(nbytes / row["builtin_us"] / 1e3, 1)
        row["custom"] = "not run: no Metal device here (the built-ins run)"
        return row
    try:
        got, want = custom(*args).astype(mx.float32), twin(*kernels.float32(*args))
        err = (mx.abs(got - want).max() / (mx.abs(want).max() + 1e-6)).item()
        row.update(ok=err <= 1e-2, max_rel_err=err)
        m = kernels.measure(lambda: custom(*args), lambda: twin(*args), rounds=iters)
        row.update(custom_us=m["custom_us"], builtin_us=m["builtin_us"],
                   custom_gbs=round(nbytes / m["custom_us"] / 1e3, 1), builtin_gbs=round(nbytes / m["builtin_us"] / 1e3, 1),
                   speedup=round(m["builtin_us"] / m["custom_us"], 3),
                   choice="custom" if m["custom"] and row["ok"] else "builtin")
    except Exception as e:  # a compile error is a finding, not a crash of the report
        row.update(ok=False, choice="builtin", error=error_line(e))
    return row


def stored_choices() -> dict:
    """What the dispatcher measured on this machine and version so far: the file, and per shape
    both timings and the choice."""
    store = kernels.store()
    rows = [{"shape": key, "custom_us": c["custom_us"], "builtin_us": c["builtin_us"],
             "choice": "custom" if c["custom"] else "builtin"} for key, c in sorted(store.choices.items())]
    return {"file": str(store.path), "machine": store.machine, "choices": rows}


def op_report(shapes: dict, dtype=mx.bfloat16, bits=4, group_size=64, iters=20) -> list:
    """Each kernel against its twin at the given model shapes, random weights."""
    metal = kernels.on_metal()
    rows = []
    for model, s in shapes.items():
        D = s["D"]
        for i, (N, K) in enumerate(s["dense"]):
            w = kernels.random_quantized((N, K), dtype, group_size, bits, mx.random.key(i))
            x = mx.random.normal((K,)).astype(dtype)
            rows.append(_compare("qmv", f"{model} {N}x{K}", kernels.qmv_custom, kernels.qmv_twin, (x, *w),
                                 iters, metal, sum(a.nbytes for a in (x, *w[:3]))))
        if s.get("E"):
            E, I, k = s["E"], s["I"], s["k"]
            gate = kernels.random_quantized((E, I, D), dtype, group_size, bits, mx.random.key(10))
            up = kernels.random_quantized((E, I, D), dtype, group_size, bits, mx.random.key(11))
            down = kernels.random_quantized((E, D, I), dtype, group_size, bits, mx.random.key(12))
            x = mx.random.normal((D,)).astype(dtype)
            ids = mx.random.permutation(E)[:k].astype(mx.uint32)
            scores = mx.softmax(mx.random.normal((k,))).astype(dtype)
            used = sum(a.nbytes for p in (gate, up, down) for a in p[:3]) * k // E  # the k selected experts
            rows.append(_compare("moe (gate+up+down)", f"{model} {k} of {E} experts, {D}->{I}->{D}",
                                 kernels.moe_custom, kernels.moe_twin, (x, ids, scores, gate, up, down), iters, metal,
                                 used + x.nbytes))
    return rows


def model_report(path: str, tokens: int = 64) -> dict:
    """Whole-model decode tok/s on a loaded model with MLX's built-ins and with `auto` (the kernels
    where the dispatcher chose them; its first steps measure, so they are not timed)."""
    from .decode import generate_step
    from .load import load_model
    from .models.cache import PromptCache

    model, _ = load_model(path)
    out = {"model": path}
    for m in ("builtin", "auto") if kernels.on_metal() else ("builtin",):
        kernels.set_mode(model, m)
        steps = generate_step(model, mx.array([1, 2, 3, 4], dtype=mx.uint32), PromptCache.new(model),
                              lambda logits: mx.argmax(logits, axis=-1))
        for _ in range(3):
            next(steps)
        tic = time.perf_counter()
        for _ in range(tokens):
            next(steps)
        out[f"decode_tps_{m}"] = tokens / (time.perf_counter() - tic)
        steps.close()
    if "decode_tps_auto" in out:
        out["ratio"] = out["decode_tps_auto"] / out["decode_tps_builtin"]
        out["kernels_disabled"] = kernels.disabled()
    return out


def environment() -> dict:
    info = {"mlx": mx.__version__, "device": str(mx.default_device()), "metal": kernels.on_metal(),
            "kernels_mode": kernels.mode(), "python": platform.python_version(), "machine": platform.machine()}
    if info["metal"]:
        info["gpu"] = mx.device_info(mx.gpu).get("device_name")
        info["bandwidth_gbs"] = bandwidth(info["gpu"])
    return info


# Apple's published memory bandwidth per chip, GB/s; where bins differ (M3 Max, M4 Max), the higher.
BANDWIDTH_GBS = {"M1": 68, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800, "M2": 100, "M2 Pro": 200,
                 "M2 Max": 400, "M2 Ultra": 800, "M3": 100, "M3 Pro": 150, "M3 Max": 400, "M3 Ultra": 819,
                 "M4": 120, "M4 Pro": 273, "M4 Max": 546, "M5": 153}


def bandwidth(device_name: str):
    """The chip's memory bandwidth in GB/s from its name ('Apple M2 Max'), or None if unknown."""
    return BANDWIDTH_GBS.get((device_name or "").removeprefix("Apple ").strip())


if __name__ == "__main__":  # python -m mlx_qwen3.selftest is `mlx-qwen3 selftest`
    from .cli import main
    main("selftest")
