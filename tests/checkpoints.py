"""Tiny random checkpoints written by transformers' save_pretrained, and the reference logits."""

import json
import shutil
from pathlib import Path

import numpy as np

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared" / "qwen3-tokenizer"

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,  # = YaRN factor x original, as real configs have it
    rms_norm_eps=1e-6,
    initializer_range=0.1,
)

# name -> (HF class names, config overrides, config.json style, max shard size)
SPECS = {
    "qwen3": ("Qwen3", dict(head_dim=32), "hub", None),
    "qwen3_tied_yarn": (
        "Qwen3",
        dict(head_dim=16, tie_word_embeddings=True, rope_parameters={**YARN, "rope_theta": 1e6}),
        "transformers",
        None,
    ),
    "qwen3_moe": (
        "Qwen3Moe",
        dict(head_dim=16, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1]),
        "hub",
        "200KB",
    ),
    "qwen3_moe_yarn": (
        "Qwen3Moe",
        dict(head_dim=16, num_hidden_layers=4, num_experts=8, num_experts_per_tok=3,
             moe_intermediate_size=32, norm_topk_prob=False, decoder_sparse_step=2,
             rope_parameters={**YARN, "rope_theta": 1e6}),
        "transformers",
        None,
    ),
    # wide enough for 4 ranks at 4 bits (every split in whole groups of 64); 2 kv heads for 4 ranks
    "qwen3_wide": (
        "Qwen3",
        dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
             num_hidden_layers=4),
        "hub",
        None,
    ),
    "qwen3_moe_wide": (
        "Qwen3Moe",
        dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
             num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
             norm_topk_prob=True, mlp_only_layers=[1]),
        "hub",
        "400KB",
    ),
    "qwen2": (
        "Qwen2",
        dict(tie_word_embeddings=True, rope_parameters={**YARN, "rope_theta": 1e6}),
        "hub",
        None,
    ),
}


def build(name: str, folder: Path, dtype: str = "float32", seed: int = 0):
    """Write checkpoint `name` into `folder` and return the transformers model (fp32, eval mode)."""
    import torch
    import transformers

    prefix, overrides, style, shard = SPECS[name]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():  # norms start at 1: move them so a missing or misplaced norm shows
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.mul_(1 + 0.3 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    saved = model.to(getattr(torch, dtype)) if dtype != "float32" else model
    saved.save_pretrained(folder, max_shard_size=shard or "1GB")
    model.float()
    if style == "hub":
        to_hub_style(folder / "config.json")
    return model


def to_hub_style(config_file: Path):
    """Rewrite a transformers-5 config.json the way Qwen's repos on the Hub spell it."""
    cfg = json.loads(config_file.read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    rope.pop("type", None)
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    config_file.write_text(json.dumps(cfg, indent=2))


def reference_logits(hf_model, ids: np.ndarray) -> np.ndarray:
    """transformers' logits, computed in float64 on a copy of the model, RoPE's cos and sin included."""
    import copy

    import torch

    exact = copy.deepcopy(hf_model).double()
    if hasattr(exact, "set_experts_implementation") and hasattr(exact.config, "num_experts"):
        exact.set_experts_implementation("eager")  # the grouped matmul takes no float64
    for module in exact.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            module.forward = _float64_rope(module)
    with torch.no_grad():
        return exact(torch.tensor(ids)).logits.numpy()


def _float64_rope(rope):
    """transformers' RoPE forward (inv_freq and attention_scaling are its own, YaRN's included), computing cos and
    sin in float64 where transformers computes them in float32 whatever the model's dtype. torch's float32 cos and
    sin, on their first call in a process, now and then came out up to 1.5e-4 off (MKL's vector math, in the
    threads of its parallel loop: the second call was right): a few processes in a hundred here, and twice the
    first reference of a CI worker (relative errors 1.6e-4 and 2.7e-4 against our logits, where 1e-6 is usual)."""
    import torch

    def forward(x, position_ids):
        freqs = position_ids[..., None].double() * rope.inv_freq.double()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * rope.attention_scaling).to(x.dtype), (emb.sin() * rope.attention_scaling).to(x.dtype)

    return forward


def prompt(batch: int, length: int, vocab: int = 256, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def copy_tokenizer(folder: Path):
    import pytest

    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"the real Qwen3 tokenizer is not at {TOKENIZER_DIR} (../shared/qwen3-tokenizer beside the repo)")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / f, folder / f)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def random_mlx_model(config: dict, seed: int = 0):
    """An MLX model of `config` (config.json's fields) with MLX's random initialisation, evaluated."""
    import mlx.core as mx

    from mlx_qwen3.load import model_args

    module, args = model_args(config)
    mx.random.seed(seed)
    model = module.Model(args)
    mx.eval(model.parameters())
    return model
