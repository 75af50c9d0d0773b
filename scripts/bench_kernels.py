"""Benchmark: each custom kernel against MLX's built-ins at Qwen3-30B-A3B and Qwen3-4B shapes.

Random weights; 4- and 8-bit, bf16 activations. Prints one JSON object (per-op microseconds and
speedups). Off Metal only the built-ins can be timed, and the report says so.

With --audit, a traffic and work audit on the CPU instead (no Metal needed; clang++-15): each
kernel at the Qwen3 shapes run from the source MLX generates under tests/metal_audit.py's counters
(device bytes loaded against the minimum, contiguity of each SIMD-group load, ops per weight),
beside the same figures worked out by hand from MLX's own qmv_fast / qmv / gather_qmv source.

    python scripts/bench_kernels.py [--iters 50]
    python scripts/bench_kernels.py --audit [--whole]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_qwen3 import kernels
from mlx_qwen3.selftest import environment

GS = 64  # mlx-community's default group size
DENSE = {  # name: [(projection, rows N, inputs K)]
    "Qwen3-4B": [("q_proj", 4096, 2560), ("k_proj, v_proj", 1024, 2560), ("o_proj", 2560, 4096),
                 ("gate_proj, up_proj", 9728, 2560), ("down_proj", 2560, 9728)],
    "Qwen3-32B": [("q_proj", 8192, 5120), ("k_proj, v_proj", 1024, 5120), ("o_proj", 5120, 8192),
                  ("gate_proj, up_proj", 25600, 5120), ("down_proj", 5120, 25600)],
    "Qwen3-4B lm_head": [("lm_head", 151936, 2560)],
}
MOE = {"Qwen3-30B-A3B": (2048, 768, 128, 8), "Qwen3-235B-A22B": (4096, 1536, 128, 8)}  # D, I, E, k
EIGHT_BIT = ("Qwen3-30B-A3B", "Qwen3-4B")
IDS = [3, 17, 29, 44, 64, 90, 101, 127]  # k distinct experts (which ones changes no count)

# ---- MLX's figures, by hand from mlx/backend/metal/kernels/quantized.h at 846d17622 ----
MLX_SOURCE = "ml-explore/mlx@846d17622 mlx/backend/metal/kernels/quantized.h (q.h) and mlx/backend/metal/quantized.cpp (q.cpp)"


def mlx_path(N: int, K: int, bits: int) -> str:
    """Which kernel MLX runs for one row (q.cpp:1739 dispatch_qmv: K 64/128 -> qmv_quad; else
    q.cpp:461 qmv, fast when N % 8 == 0 and K % (pack_factor * 2 * 32) == 0, q.cpp:147 and :484;
    gather_qmv picks the same way, q.cpp:1337)."""
    if K in (64, 128):
        return "qmv_quad"
    return "qmv_fast" if N % 8 == 0 and K % (32 // bits * 2 * 32) == 0 else "qmv"


def mlx_per_weight(path: str, bits: int) -> dict:
    """Ops per weight of MLX's qmv_fast_impl (q.h:758) / qmv_impl (q.h:825) at group size 64, bf16.
    A lane takes v = values_per_thread inputs per step (q.h:769/838: 2 packs per lane in qmv_fast,
    1 in qmv; v = 16 / 8 at 4 bits, 8 / 4 at 8 bits) and does them for 4 rows (q.h:771,
    results_per_simdgroup), so per-step x work is shared by 4 v weights:
      load_vector (q.h:29; 4-bit q.h:62-70, 8-bit q.h:97-101): v loads and v bf16 converts of x,
        v adds for the sum, and at 4 bits 3 of 4 values scaled (x / 16, / 256, / 4096: a multiply);
      qdot (q.h:192): 4-bit (q.h:235-243) reads uint16 words, one AND per weight (the shift is
        folded into x's scale), its convert, and per 4 weights 1 mul + 3 fma + 1 add; 8-bit
        (q.h:283-287) one convert and one fma per weight, no bitwise op; then per row and step
        `scale * accum + sum * bias` (q.h:289): 1 mul + 1 fma;
      per row and step one scale and one bias load and convert (q.h:805-806, q.h:885-886)."""
    v = (16 if path == "qmv_fast" else 8) if bits == 4 else (8 if path == "qmv_fast" else 4)
    x_share = 1 / (4 * v)  # per x value, per weight
    if bits == 4:
        bitwise, convert, fma, flt = 1.0, 1.0, 0.75, 0.5
        flt += v * 3 / 4 * x_share
    else:
        bitwise, convert, fma, flt = 0.0, 1.0, 1.0, 0.0
    convert += v * x_share + 2 / v
    flt += v * x_share + 1 / v
    fma += 1 / v
    loads = (v // 2 if bits == 4 else v) / v + 2 / v + v * x_share  # uint16 / uint8 word loads, scale + bias, x
    return {"bitwise": bitwise, "int": 0.0, "convert": convert, "unpack": bitwise + convert, "fma": fma,
            "float": round(flt, 4), "device_loads": round(loads, 4)}


def mlx_launch(N: int, K: int, bits: int, experts: int = 1) -> dict:
    """Bytes one MLX (gather_)qmv launch loads: each weight, scale and bias byte in exactly one
    SIMD-group request (a simdgroup owns 4 whole rows, q.h:788), and x once per simdgroup
    (q.h:794, :813: every simdgroup reads all of it, N / 4 times per expert)."""
    weights = experts * N * (K * bits // 8 + 2 * 2 * K // GS)
    x = experts * (N // 4) * 2 * K
    return {"weight_bytes": weights, "x_bytes": x, "bytes_loaded": weights + x,
            "contiguous": "weights, scales, biases: each row's step is one contiguous span per simdgroup "
                          "(lanes at consecutive 8-byte offsets in qmv_fast, q.h:791; 4-byte in qmv); per load instruction, "
                          "2-byte (4-bit) or 1-byte (8-bit) word loads and x's 2-byte loads are strided "
                          "unless the Metal compiler merges a lane's loads"}


def mlx_reference() -> dict:
    return {"source": MLX_SOURCE,
            "per_weight": {f"{p} {b}-bit": mlx_per_weight(p, b) for p in ("qmv_fast", "qmv") for b in (4, 8)},
            "notes": "MoE decode in MLX is three gather_qmv launches (gate, up, down; q.h:2086 "
                     "affine_gather_qmv_fast / q.h:2148 affine_gather_qmv, each qmv_fast_impl / qmv_impl "
                     "after adjust_matrix_offsets), so x is read by the gate and the up launch separately, "
                     "plus separate SwiGLU and combine ops."}


# ---- the audit ----

def _audit_launches(run, whole: bool) -> list:
    import metal_audit

    record = []
    saved = kernels.launch
    kernels.launch = metal_audit.launcher(record, whole=whole)
    try:
        run()
    finally:
        kernels.launch = saved
    return record


def _summary(name, fig, inputs, minimum, weights, bits, mlx) -> dict:
    """One launch's figures against the minimum and MLX's."""
    bufs = fig["buffers"]
    act = inputs[0]  # x or h: every kernel's first input is the activation
    wnames = [n for n in inputs[1:] if n in bufs and bufs[n]["size"] > 0 and n not in ("ids", "scores")]
    loaded = sum(b["coalesced"] for b in bufs.values())
    wloaded = sum(bufs[n]["coalesced"] for n in wnames)
    unique = sum(b["unique"] for b in bufs.values())
    ops = {c: v / weights for c, v in fig["ops"].items()}
    lane_loads = sum(b["loads"] for b in bufs.values())
    requests = sum(b["requests"] for b in bufs.values())
    noncontig = {n: f"{b['noncontiguous']}/{b['requests']}" for n, b in bufs.items() if b["requests"]}
    return {
        "kernel": name, "bits": bits, "weights": weights, "threadgroups": fig["threadgroups"],
        "threadgroups_run": fig["threadgroups_run"],
        "minimum_bytes": minimum["all"], "bytes_loaded": loaded, "bytes_loaded_vs_min": round(loaded / minimum["all"], 4),
        "activation_share_of_loaded": round(bufs[act]["coalesced"] / loaded, 4),
        "weight_stream_bytes": wloaded, "weight_stream_vs_min": round(wloaded / minimum["weights"], 4),
        "unique_bytes": unique, "unique_vs_min": round(unique / minimum["all"], 4),
        "requests": requests, "noncontiguous_requests": noncontig,
        "per_weight": {**{c: round(v, 4) for c, v in ops.items()},
                       "unpack": round(ops["bitwise"] + ops["int"] + ops["convert"], 4),
                       "device_loads": round(lane_loads / weights, 4)},
        "mlx": mlx,
    }


def _nbytes(*arrays) -> int:
    return sum(a.nbytes for a in arrays)


def _proj(shape, bits):
    *lead, N, K = shape
    # zeros: contents change no count, and big ones are never materialized (the executor zero-fills)
    return (mx.zeros((*lead, N, K * bits // 32), mx.uint32), mx.zeros((*lead, N, K // GS), mx.bfloat16),
            mx.zeros((*lead, N, K // GS), mx.bfloat16), GS, bits)


def audit(whole: bool) -> dict:
    out = {"mlx_reference": mlx_reference(), "dense": [], "moe": []}
    for model, projs in DENSE.items():
        for bits in (4, 8) if model in EIGHT_BIT else (4,):
            for proj, N, K in projs:
                w = _proj((N, K), bits)
                x = mx.zeros((K,), mx.bfloat16)
                (name, fig), = _audit_launches(lambda: kernels.qmv_custom(x, *w), whole)
                minimum = {"weights": _nbytes(*w[:3])}
                minimum["all"] = minimum["weights"] + x.nbytes
                path = mlx_path(N, K, bits)
                mlx = {"kernel": path, **mlx_launch(N, K, bits)}
                mlx["bytes_loaded_vs_min"] = round(mlx["bytes_loaded"] / minimum["all"], 4)
                row = _summary(name, fig, kernels.QMV.inputs, minimum, N * K, bits, mlx)
                out["dense"].append({"model": model, "proj": proj, "N": N, "K": K, **row})
    for model, (D, I, E, k) in MOE.items():
        for bits in (4, 8) if model in EIGHT_BIT else (4,):
            gate, up, down = _proj((E, I, D), bits), _proj((E, I, D), bits), _proj((E, D, I), bits)
            x, ids = mx.zeros((D,), mx.bfloat16), mx.array(IDS[:k], mx.uint32)
            scores = mx.full((k,), 1 / k, mx.bfloat16)
            record = _audit_launches(lambda: kernels.moe_custom(x, ids, scores, gate, up, down), whole)
            share = k / E  # the k selected experts' slices only
            h_bytes = k * I * 2
            for (name, fig), spec in zip(record, ("gate_up", "down")):
                if spec == "gate_up":
                    wmin = share * (_nbytes(*gate[:3]) + _nbytes(*up[:3]))
                    minimum = {"weights": wmin, "all": wmin + x.nbytes + ids.nbytes}
                    inputs, weights = kernels.MOE_GATE_UP.inputs, 2 * k * I * D
                    path = mlx_path(I, D, bits)
                    mlx = {"kernel": f"gather_{path} x2 (gate, up)", **mlx_launch(I, D, bits, 2 * k)}
                else:
                    wmin = share * _nbytes(*down[:3])
                    minimum = {"weights": wmin, "all": wmin + h_bytes + ids.nbytes + scores.nbytes}
                    inputs, weights = kernels.MOE_DOWN.inputs, k * D * I
                    path = mlx_path(D, I, bits)
                    mlx = {"kernel": f"gather_{path}", **mlx_launch(D, I, bits, k)}
                mlx["bytes_loaded_vs_min"] = round(mlx["bytes_loaded"] / minimum["all"], 4)
                row = _summary(name, fig, inputs, minimum, weights, bits, mlx)
                out["moe"].append({"model": model, "D": D, "I": I, "E": E, "k": k, **row})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--audit", action="store_true", help="the traffic and work audit on the CPU (clang++-15)")
    ap.add_argument("--whole", action="store_true", help="with --audit: run every threadgroup, not first/middle/last")
    args = ap.parse_args()
    report = {"environment": environment()}
    if args.audit:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        start = time.time()
        report["audit"] = audit(args.whole)
        report["audit"]["seconds"] = round(time.time() - start, 1)
    else:
        from mlx_qwen3.selftest import DEFAULT_SHAPES, op_report

        for bits in (4, 8):
            report[f"{bits}bit"] = op_report(DEFAULT_SHAPES, mx.bfloat16, bits, 64, args.iters)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
