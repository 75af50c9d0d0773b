"""Benchmark: the quantized KV cache at Qwen3-0.6B's attention shapes (8 kv heads, head_dim 128).

Prints one JSON object: KV bytes per token at 16/8/4 bits for all 28 layers (measured from the caches'
nbytes), and decode tok/s at a `--context`-token cache for each setting, ours (our model, our caches)
against mlx-lm (its qwen3 model with the same weights, its KVCache / QuantizedKVCache) in the same run,
runs alternating. Fewer layers than 28 for speed (--layers): tok/s compares settings, not the real
model. The caches are filled with the same random keys and values (no prompt pass: only decode is
timed). Also the logit error of one decode step at 8 and 4 bits against 16-bit, on the same model.

    python scripts/bench_kv.py [--context 4096] [--decode 32] [--layers 4] [--repeat 3] [--dtype float32]
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

SHAPES = dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
              num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
              max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True)
SETTINGS = (None, 8, 4)


def models(layers: int, dtype):
    from mlx_lm.models import qwen3 as peer_qwen3

    from mlx_qwen3.load import model_args

    config = dict(SHAPES, num_hidden_layers=layers)
    module, args = model_args(config)
    mx.random.seed(0)
    ours = module.Model(args)
    ours.set_dtype(dtype)
    mx.eval(ours.parameters())
    peer = peer_qwen3.Model(peer_qwen3.ModelArgs.from_dict(config))
    peer.load_weights(tree_flatten(ours.parameters()))  # the same names: the same model
    mx.eval(peer.parameters())
    return ours, peer


def our_cache(model, bits):
    from mlx_qwen3.models.cache import make_cache

    return make_cache(model, bits)


def peer_cache(model, bits):
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    return [KVCache() if bits is None else QuantizedKVCache(64, bits) for _ in model.layers]


def filled(cache, kvs):
    for c, (k, v) in zip(cache, kvs):
        c.update_and_fetch(k, v)
    mx.eval([c.state for c in cache])
    return cache


def decode(model, cache, steps: int) -> float:
    """Greedy decode tok/s from a filled cache (the first step untimed: it warms up)."""
    y = mx.array([[1]])
    tic = None
    for i in range(steps + 1):
        y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
        mx.eval(y)
        if i == 0:
            tic = time.perf_counter()
    return steps / (time.perf_counter() - tic)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="float32 by default: MLX's CPU quantized matmul is inexact in half precision")
    args = ap.parse_args()
    dtype = getattr(mx, args.dtype)
    ours, peer = models(args.layers, dtype)
    rng = np.random.default_rng(0)
    shape = (1, SHAPES["num_key_value_heads"], args.context, SHAPES["head_dim"])
    kvs = [tuple(mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype) for _ in range(2))
           for _ in range(args.layers)]

    # bytes per token: one fp16 layer cache of `context` positions (as a Mac holds it), times 28 layers
    half = mx.zeros(shape, mx.float16)
    per_token = {}
    for bits in SETTINGS:
        cache = filled(our_cache(ours, bits)[:1], [(half, half)])
        per_token[str(bits or 16)] = cache[0].nbytes * 28 // args.context

    # the logit error of one decode step at this context, against the 16-bit cache
    logits = {bits: ours(mx.array([[1]]), cache=filled(our_cache(ours, bits), kvs)).astype(mx.float32)
              for bits in SETTINGS}
    ref = np.array(logits[None], np.float64)
    error = {str(bits): {"relative_l2": float(np.linalg.norm(np.array(logits[bits], np.float64) - ref) /
                                                np.linalg.norm(ref)),
                         "max_abs": float(np.abs(np.array(logits[bits], np.float64) - ref).max())}
             for bits in (8, 4)}

    runs = {(side, bits): [] for side in ("ours", "mlx_lm") for bits in SETTINGS}
    for _ in range(args.repeat):
        for bits in SETTINGS:
            runs["ours", bits].append(decode(ours, filled(our_cache(ours, bits), kvs), args.decode))
            runs["mlx_lm", bits].append(decode(peer, filled(peer_cache(peer, bits), kvs), args.decode))
    tps = {side: {str(bits or 16): round(statistics.median(runs[side, bits]), 2) for bits in SETTINGS}
           for side in ("ours", "mlx_lm")}
    print(json.dumps({
        "shapes": "Qwen3-0.6B attention (8 kv heads, head_dim 128, group 64)",
        "kv_bytes_per_token_28_layers": per_token,
        "kv_bytes_ratio_vs_16": {k: round(per_token[k] / per_token["16"], 4) for k in ("8", "4")},
        "context": args.context, "layers": args.layers, "dtype": args.dtype, "device": str(mx.default_device()),
        "decode_tok_s": tps,
        "decode_ratio_vs_16": {k: round(tps["ours"][k] / tps["ours"]["16"], 3) for k in ("8", "4")},
        "decode_ratio_vs_mlx_lm": {k: round(tps["ours"][k] / tps["mlx_lm"][k], 3) for k in tps["ours"]},
        "logit_error_one_step": error,
    }, indent=1))


if __name__ == "__main__":
    main()
