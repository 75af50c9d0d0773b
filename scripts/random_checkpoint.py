"""Random bf16 checkpoints at real Qwen3 shapes, laid out as save_pretrained writes them (for benchmarks).

    python scripts/random_checkpoint.py OUT --shape qwen3-0.6b [--layers N]
"""

import argparse
import json
import math
import shutil
from pathlib import Path

import mlx.core as mx

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "qwen3-tokenizer"

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),  # Qwen3's vocabulary, little else
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, tie_word_embeddings=False),  # untied here, to weigh more
}


def config_for(shape: str, layers=None) -> dict:
    c = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=64 if shape == "tiny" else 128, vocab_size=151936,
             max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000, torch_dtype="bfloat16",
             **SHAPES[shape])
    if layers:
        c["num_hidden_layers"] = layers
    return c


def tensor_shapes(c: dict) -> dict:
    H, I, D = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], H), "model.norm.weight": (H,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], H)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (q, H), f"{p}.self_attn.k_proj.weight": (kv, H),
            f"{p}.self_attn.v_proj.weight": (kv, H), f"{p}.self_attn.o_proj.weight": (H, q),
            f"{p}.self_attn.q_norm.weight": (D,), f"{p}.self_attn.k_norm.weight": (D,),
            f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H),
            f"{p}.mlp.down_proj.weight": (H, I),
            f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
        })
    return shapes


def make_checkpoint(folder: Path, config: dict, shard_bytes: int = 500 * 10**6) -> int:
    """Write random weights shard by shard with an index and the real tokenizer; returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, shape in tensor_shapes(config).items():
        n = 2 * math.prod(shape)
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += n
    shards.append(current)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (mx.random.normal(s) * (0.02 if len(s) == 2 else 1.0) + (0 if len(s) == 2 else 1)).astype(mx.bfloat16)
                   for k, s in names.items()}
        mx.save_safetensors(str(folder / file), tensors, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({k: file for k in names})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (TOKENIZER / f).is_file():
            shutil.copy(TOKENIZER / f, folder / f)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--layers", type=int, default=None)
    args = ap.parse_args()
    print(make_checkpoint(Path(args.out), config_for(args.shape, args.layers)))


if __name__ == "__main__":
    main()
