"""Benchmark: prompt and decode speed of ours against mlx-lm on one 4-bit random checkpoint.

Qwen3-0.6B's shapes by default, converted to 4-bit once; both libraries load the same folder.
Runs alternate (ours, mlx-lm, ours, ...) and the median of each side is kept. Also times what our
text layer (thinking router + streaming detokenizer) adds per token. Prints one JSON object.

    python scripts/bench_generate.py [--prompt-tokens 512] [--decode-tokens 128] [--repeat 3]
                                     [--layers N] [--model MLX_FOLDER]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent
GREEDY = lambda logits: mx.argmax(logits, axis=-1)  # noqa: E731  the same sampler on both sides


def ours(model, prompt: list, decode: int):
    from mlx_qwen3.decode import generate_step
    from mlx_qwen3.models.cache import PromptCache

    return _time(generate_step(model, mx.array(prompt, dtype=mx.uint32), PromptCache.new(model), GREEDY), decode)


def peer(model, prompt: list, decode: int):
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(prompt, dtype=mx.uint32), model, max_tokens=decode, sampler=GREEDY)
    return _time((int(t) for t, _ in steps), decode)


def _time(tokens, decode: int):
    """-> (prompt tok/s without the first token's sampling, decode tok/s, the tokens)."""
    tic = time.perf_counter()
    out = [next(tokens)]
    first = time.perf_counter() - tic
    tic = time.perf_counter()
    for _ in range(decode - 1):
        out.append(next(tokens))
    rest = time.perf_counter() - tic
    tokens.close()
    return first, (decode - 1) / rest, out


def text_layer_seconds(tokenizer, tokens: list, rounds: int = 20) -> float:
    """Per-token time of the router and detokenizer over a realistic stream (thinking, answer, CJK, emoji)."""
    from mlx_qwen3.thinking import ThinkingRouter

    text = ("Let me think about this step by step: 12 × 7 = 84, and naïve café → 世界 🙂. " * 4)
    stream = ([tokenizer.token_id("<think>")] + tokenizer.encode(text) + [tokenizer.token_id("</think>")]
              + tokenizer.encode("\n\nThe answer is 84. 答案是 84。") + tokens)
    tic = time.perf_counter()
    for _ in range(rounds):
        router = ThinkingRouter(tokenizer)
        for t in stream:
            router.feed(t)
        router.finish()
    return (time.perf_counter() - tic) / (rounds * len(stream))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than Qwen3-0.6B's 28 (a slow machine)")
    ap.add_argument("--model", default=None, help="an MLX folder to use instead of a random checkpoint")
    args = ap.parse_args()

    from mlx_lm import load as mlx_lm_load

    from mlx_qwen3 import load
    from mlx_qwen3.convert import convert

    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    folder = args.model
    if folder is None:
        layers = ["--layers", str(args.layers)] if args.layers else []
        subprocess.run([sys.executable, str(HERE / "random_checkpoint.py"), str(work / "hf"), "--shape", "qwen3-0.6b",
                        *layers], check=True, stdout=subprocess.DEVNULL)
        folder = convert(work / "hf", work / "q4", quantize=True)
    model, tokenizer = load(folder)
    peer_model, _ = mlx_lm_load(str(folder))
    prompt = mx.random.randint(0, 150000, (args.prompt_tokens,)).tolist()

    runs = {"ours": [], "mlx_lm": []}
    ours(model, prompt[:16], 4)  # warm up both (kernel compilation, allocator)
    peer(peer_model, prompt[:16], 4)
    for _ in range(args.repeat):
        for name, fn, m in (("ours", ours, model), ("mlx_lm", peer, peer_model)):
            first, decode_tps, tokens = fn(m, prompt, args.decode_tokens)
            runs[name].append({"prompt_tps": args.prompt_tokens / first, "decode_tps": decode_tps})
    ids = mx.array([prompt[:64]])
    a, b = model(ids)[0, -1].astype(mx.float32), peer_model(ids)[0, -1].astype(mx.float32)
    logits_diff = ((a - b).abs().max() / b.abs().max()).item()

    med = {k: {m: statistics.median(r[m] for r in v) for m in ("prompt_tps", "decode_tps")} for k, v in runs.items()}
    per_token = text_layer_seconds(tokenizer, tokens)
    step = 1 / med["ours"]["decode_tps"]
    print(json.dumps({
        "model": str(folder) if args.model else f"random 4-bit, Qwen3-0.6B shapes, {model.args.num_hidden_layers} layers",
        "device": str(mx.default_device()),
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "ours": med["ours"],
        "mlx_lm": med["mlx_lm"],
        "ratio_prompt": med["ours"]["prompt_tps"] / med["mlx_lm"]["prompt_tps"],
        "ratio_decode": med["ours"]["decode_tps"] / med["mlx_lm"]["decode_tps"],
        "text_layer_us_per_token": per_token * 1e6,
        "text_layer_share_of_decode_step": per_token / step,
        "logits_max_rel_diff": logits_diff,  # same weights, same math: bf16 rounding only
        "runs": runs,
    }))


if __name__ == "__main__":
    main()
