"""Benchmark: long context at Qwen3-0.6B's attention shapes, ours against mlx-lm's generator (issue 13).

A random checkpoint with Qwen3-0.6B's attention (16 q heads, 8 kv heads, head_dim 128, q/k norm,
rope_theta 1e6), few layers and a small vocabulary (attention, not the LM head, dominates), YaRN
factor 4 over 32,768 (max_position_embeddings 131072, so both runners take 33K), saved once in a temp
folder and loaded by both libraries. For each context and KV setting (16 / 8 / 4 bits, group 64,
quantized from the first token on both sides), each side's generator processes the last `--window`
tokens of the context over a cache already holding the rest (random keys and values: filling 32K
positions by prefill takes too long on a CPU), then decodes `--decode` tokens. Prompt tok/s is that
window's rate at that context; the whole-context rate is extrapolated from the windows (per-token
cost linear in the position) and marked so. Rates are per second of this process's CPU time (on a
shared machine, other processes' work does not count), the wall-clock rates beside them. Runs
alternate ours / mlx-lm; the median of --repeat runs is kept (--repeat-long beyond 8K). KV bytes per
token are measured on fp16 caches, as a Mac holds them. Prints one JSON object, with each issue-13
target and whether it is met.

    python scripts/bench_long_context.py [--contexts 4096,16384,33000] [--window 128] [--decode 8]
                                         [--layers 2] [--repeat 3] [--repeat-long 1] [--dtype float32]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from bench_generate import GREEDY
from bench_kv import filled, our_cache, peer_cache
from random_checkpoint import config_for, make_checkpoint

SETTINGS = (None, 8, 4)
VOCAB = 1024
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def checkpoint(folder: Path, layers: int) -> Path:
    config = dict(config_for("qwen3-0.6b", layers), vocab_size=VOCAB, rope_scaling=YARN,
                  max_position_embeddings=131072)
    mx.random.seed(0)
    make_checkpoint(folder, config)
    return folder


def load_both(folder: Path, dtype):
    from mlx_lm.utils import load_model as peer_load

    from mlx_qwen3.load import load_model

    ours, _ = load_model(folder, rope="config")  # mlx-lm's YaRN is static: the same rotation at every length
    peer, _ = peer_load(folder)
    for m in (ours, peer):
        m.set_dtype(dtype)
        mx.eval(m.parameters())
    return ours, peer


def run_ours(model, layers: list, held: int, bits, window: list, decode: int):
    from mlx_qwen3.decode import generate_step
    from mlx_qwen3.models.cache import CacheSetting, PromptCache

    cache = PromptCache(layers, [0] * held, CacheSetting(bits))
    return _time(generate_step(model, mx.array(window, dtype=mx.uint32), cache, GREEDY), decode)


def run_peer(model, layers: list, held: int, bits, window: list, decode: int):
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(window, dtype=mx.uint32), model, max_tokens=decode, sampler=GREEDY,
                          prompt_cache=layers, kv_bits=bits, kv_group_size=64, quantized_kv_start=0)
    return _time((int(t) for t, _ in steps), decode)


def _time(tokens, decode: int) -> dict:
    """Seconds to the first token (the window) and for the `decode - 1` after it, by the wall clock and
    by this process's CPU time: the CPU time is what other processes on a shared machine do not change."""
    clocks = {"": time.process_time, "_wall": time.perf_counter}
    start = {k: c() for k, c in clocks.items()}
    next(tokens)
    first = {k: c() for k, c in clocks.items()}
    for _ in range(decode - 1):
        next(tokens)
    tokens.close()
    out = {}
    for k, c in clocks.items():
        now = c()
        out["prompt" + k], out["decode" + k] = first[k] - start[k], now - first[k]
    return out


SIDES = {"ours": (run_ours, our_cache), "mlx_lm": (run_peer, peer_cache)}


def kv_bytes_per_token(models: dict, context: int, kv_heads: int, head_dim: int) -> dict:
    """One layer's cache of `context` fp16 positions (preallocation included), per token, per side and setting."""
    half = mx.zeros((1, kv_heads, context, head_dim), mx.float16)
    return {side: {str(bits or 16): filled(SIDES[side][1](models[side], bits)[:1], [(half, half)])[0].nbytes / context
                   for bits in SETTINGS} for side in SIDES}


def extrapolate(rates: dict, window: int) -> dict:
    """Whole-context prompt tok/s from windows' rates: seconds per token a + b * position, fitted over the
    contexts, summed over positions 0..C-1."""
    contexts = sorted(rates)
    if len(contexts) < 2:
        return {}
    positions = [c - window / 2 for c in contexts]
    b, a = np.polyfit(positions, [1 / rates[c] for c in contexts], 1)
    return {c: round(c / (a * c + b * c * c / 2), 2) for c in contexts}


def ratio(x: float, y: float) -> float:
    return round(x / y, 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,16384,33000", help="comma-separated context lengths")
    ap.add_argument("--window", type=int, default=128, help="prompt tokens processed (the context's last)")
    ap.add_argument("--decode", type=int, default=8, help="tokens decoded after the context")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs per side at contexts up to 8K")
    ap.add_argument("--repeat-long", type=int, default=1, help="runs per side at longer contexts")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="float32 by default: MLX's CPU quantized matmul is slow and inexact in half precision")
    args = ap.parse_args()
    contexts = sorted(int(c) for c in args.contexts.split(","))
    if args.window < 2 or args.decode < 2 or contexts[0] <= args.window:
        ap.error("--window and --decode must be at least 2, and every context longer than --window")
    dtype = getattr(mx, args.dtype)
    repeats = lambda n: args.repeat if n <= 8192 else args.repeat_long  # noqa: E731

    with tempfile.TemporaryDirectory(prefix="bench_long_context_") as tmp:  # the weights are in memory after
        ours, peer = load_both(checkpoint(Path(tmp) / "model", args.layers), dtype)
    models = {"ours": ours, "mlx_lm": peer}
    c = ours.args
    head_dim, kv_heads = c.head_dim, c.num_key_value_heads

    ids = mx.array([list(range(1, 65))])
    a, b = ours(ids)[0, -1], peer(ids)[0, -1]
    logits_diff = ((a - b).abs().max() / b.abs().max()).item()

    rng = np.random.default_rng(0)
    window = rng.integers(0, VOCAB, args.window).tolist()
    run_ours(ours, our_cache(ours, None), 0, None, window[:16], 2)  # warm up both
    run_peer(peer, peer_cache(peer, None), 0, None, window[:16], 2)
    runs = {(side, n, bits): [] for side in SIDES for n in contexts for bits in SETTINGS}
    turn = 0
    for n in contexts:
        held = n - args.window
        shape = (1, kv_heads, held, head_dim)
        kvs = [tuple(mx.array(rng.standard_normal(shape, np.float32)).astype(dtype) for _ in range(2))
               for _ in range(args.layers)]
        mx.eval(kvs)
        for _ in range(repeats(n)):
            for bits in SETTINGS:
                order = list(SIDES) if turn % 2 == 0 else list(SIDES)[::-1]  # neither side always first
                turn += 1
                for side in order:
                    run, make = SIDES[side]
                    s = run(models[side], filled(make(models[side], bits), kvs), held, bits, window, args.decode)
                    runs[side, n, bits].append({k: (args.window if k.startswith("prompt") else args.decode - 1) / v
                                                for k, v in s.items()})
        del kvs

    def median(side, n, bits, what):
        return round(statistics.median(r[what] for r in runs[side, n, bits]), 2)

    figures = {side: {str(n): {str(bits or 16): {f"{what}_tok_s{clock}": median(side, n, bits, what + clock)
                                                 for what in ("prompt", "decode") for clock in ("", "_wall")}
                               for bits in SETTINGS} for n in contexts} for side in SIDES}
    for side in SIDES:
        for bits in SETTINGS:
            k = str(bits or 16)
            whole = extrapolate({n: figures[side][str(n)][k]["prompt_tok_s"] for n in contexts}, args.window)
            for n, tps in whole.items():
                figures[side][str(n)][k]["prompt_tok_s_whole_context_extrapolated"] = tps
    kv = kv_bytes_per_token(models, contexts[-1], kv_heads, head_dim)

    longest = str(contexts[-1])
    o, p = figures["ours"], figures["mlx_lm"]
    vs_peer = {f"{what}_{n}_{bits}": ratio(o[n][bits][what + "_tok_s"], p[n][bits][what + "_tok_s"])
               for n in o for bits in o[n] for what in ("prompt", "decode")}
    targets = {
        "kv_bytes_8_vs_16 <= 0.55": ratio(kv["ours"]["8"], kv["ours"]["16"]),
        "kv_bytes_4_vs_16 <= 0.30": ratio(kv["ours"]["4"], kv["ours"]["16"]),
        f"decode_{longest}_8_vs_16 >= 0.9": ratio(o[longest]["8"]["decode_tok_s"], o[longest]["16"]["decode_tok_s"]),
        "every ours / mlx_lm >= 1.0 (the lowest)": min(vs_peer.values()),
    }
    bounds = [(0.55, -1), (0.30, -1), (0.9, 1), (1.0, 1)]
    met = {k: v * sign >= bound * sign for (k, v), (bound, sign) in zip(targets.items(), bounds)}
    print(json.dumps({
        "model": f"random, Qwen3-0.6B attention (16 q / 8 kv heads, head_dim 128), {args.layers} layers, "
                 f"vocab {VOCAB}, YaRN factor 4 over 32768",
        "device": str(mx.default_device()), "dtype": args.dtype,
        "contexts": contexts, "window": args.window, "decode_tokens": args.decode,
        "method": f"prompt_tok_s: each side's generator processes the last {args.window} tokens of the context "
                  "over a cache holding the rest (random keys/values); decode_tok_s: the tokens after it. "
                  "prompt_tok_s_whole_context_extrapolated: EXTRAPOLATED from the windows (seconds per token "
                  "linear in the position), not measured. tok_s: per second of this process's CPU time (a "
                  "shared machine: others' work does not count); tok_s_wall: per wall-clock second. KV "
                  "quantized from the first token on both sides (ours kv_start=0, mlx-lm quantized_kv_start=0), "
                  "group 64.",
        "runs_per_side": {str(n): repeats(n) for n in contexts},
        "kv_bytes_per_token_per_layer_fp16": kv,
        "ours": o,
        "mlx_lm": p,
        "ours_vs_mlx_lm": vs_peer,
        "targets": targets,
        "met": met,
        "logits_max_rel_diff_ours_vs_mlx_lm": logits_diff,
    }, indent=1))


if __name__ == "__main__":
    main()
