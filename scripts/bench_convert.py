"""Benchmark: convert a random multi-shard bf16 checkpoint to 4-bit with ours and with mlx_lm.convert.

Prints one JSON object: wall time and peak RSS of each converter (each in its own process), and
ours / mlx-lm ratios. Needs mlx-lm and the real tokenizer in ../shared/qwen3-tokenizer (mlx-lm's
converter insists on a tokenizer).

    python scripts/bench_convert.py [--layers 8] [--repeat 1] [--workdir DIR]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "qwen3-tokenizer"

# Qwen3-1.7B's shapes with fewer layers and an untied lm_head: about 2 GB in bf16 at 8 layers.
CONFIG = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=2048, intermediate_size=6144,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000, tie_word_embeddings=False,
    torch_dtype="bfloat16",
)


def make_checkpoint(folder: Path, layers: int, shard_bytes: int = 500 * 10**6):
    """Random bf16 weights, written shard by shard with an index, as save_pretrained lays them out."""
    c = dict(CONFIG, num_hidden_layers=layers)
    H, I, D = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], H), "lm_head.weight": (c["vocab_size"], H),
              "model.norm.weight": (H,)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (q, H), f"{p}.self_attn.k_proj.weight": (kv, H),
            f"{p}.self_attn.v_proj.weight": (kv, H), f"{p}.self_attn.o_proj.weight": (H, q),
            f"{p}.self_attn.q_norm.weight": (D,), f"{p}.self_attn.k_norm.weight": (D,),
            f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H),
            f"{p}.mlp.down_proj.weight": (H, I),
            f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
        })
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += n
    shards.append(current)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (mx.random.normal(s) * 0.02).astype(mx.bfloat16) for k, s in names.items()}
        mx.save_safetensors(str(folder / file), tensors, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({k: file for k in names})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(c))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, folder / f)


def measure(code: str) -> dict:
    """Run `code` in a fresh Python; its wall time and peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"conversion failed: {proc.stderr.read().decode()[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where the checkpoint and outputs go (a temp folder)")
    ap.add_argument("--make", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        make_checkpoint(Path(args.make), args.layers)
        return
    if not (TOKENIZER / "tokenizer.json").is_file():
        raise SystemExit(f"error: the Qwen3 tokenizer is not at {TOKENIZER}; mlx_lm.convert needs one")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    src = work / "hf"
    src.mkdir(parents=True, exist_ok=True)
    # Made in a child process: a child's peak RSS counts its parent's at fork time.
    subprocess.run([sys.executable, __file__, "--make", str(src), "--layers", str(args.layers)], check=True)
    size = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    ours_code = f"from mlx_qwen3.convert import convert; convert({str(src)!r}, {str(work / 'ours')!r}, quantize=True)"
    peer_code = (
        "from mlx_lm import convert; "
        f"convert({str(src)!r}, {str(work / 'mlx_lm')!r}, quantize=True, q_bits=4, q_group_size=64)"
    )
    runs = {"ours": [], "mlx_lm": []}
    for _ in range(args.repeat):  # interleaved, so drift in the machine hits both alike
        for name, code in (("ours", ours_code), ("mlx_lm", peer_code)):
            shutil.rmtree(work / name, ignore_errors=True)
            runs[name].append(measure(code))
    best = {k: {m: min(r[m] for r in v) for m in ("seconds", "peak_rss_gb")} for k, v in runs.items()}
    print(json.dumps({
        "checkpoint_gb": round(size / 1e9, 3),
        "shards": len(list(src.glob("*.safetensors"))),
        "ours": best["ours"],
        "mlx_lm": best["mlx_lm"],
        "ratio_time": round(best["ours"]["seconds"] / best["mlx_lm"]["seconds"], 3),
        "ratio_peak_rss": round(best["ours"]["peak_rss_gb"] / best["mlx_lm"]["peak_rss_gb"], 3),
        "runs": runs,
    }))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
