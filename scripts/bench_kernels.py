"""Benchmark: each custom kernel against MLX's built-ins at Qwen3-30B-A3B and Qwen3-4B shapes.

Random weights; 4- and 8-bit, bf16 activations. Prints one JSON object (per-op microseconds and
speedups). Off Metal only the built-ins can be timed, and the report says so.

    python scripts/bench_kernels.py [--iters 50]
"""

import argparse
import json

import mlx.core as mx

from mlx_qwen3.selftest import DEFAULT_SHAPES, environment, op_report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    report = {"environment": environment()}
    for bits in (4, 8):
        report[f"{bits}bit"] = op_report(DEFAULT_SHAPES, mx.bfloat16, bits, 64, args.iters)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
