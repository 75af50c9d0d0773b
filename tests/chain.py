"""Tiny Qwen3 checkpoints whose greedy output is a script we choose, for driving the whole text path.

Layers whose o_proj and down_proj are zero, so the residual stream carries the token embedding
to the head unchanged; the lm_head then maps each token of the script to the next (a Markov
chain: within one script a token may have only one successor).
"""

import json
import re
from functools import lru_cache

import mlx.core as mx
import numpy as np
from checkpoints import TOKENIZER_DIR, copy_tokenizer

from mlx_qwen3.tokenizer import Tokenizer

H = 64
VOCAB = 151936  # Qwen3's embedding rows (the tokenizer uses 151669 of them)
SHARPNESS = 5.0  # the head's scale: sampling at Qwen's defaults (temperature 0.6, top-k 20) follows the script too


@lru_cache(maxsize=1)
def _tokenizer():
    return Tokenizer.from_folder(TOKENIZER_DIR)


def tokenizer():
    import pytest

    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"the real Qwen3 tokenizer is not at {TOKENIZER_DIR} (../shared/qwen3-tokenizer beside the repo)")
    return _tokenizer()


def ids_of(tok, pieces) -> list:
    """Pieces are text, or special tokens such as '<think>' written alone."""
    out = []
    for p in pieces:
        special = tok.token_id(p) if p.startswith("<") and p.endswith(">") else None
        out += [special] if special is not None else tok.encode(p)
    return out


# Tokens of a's, b's and spaces, each one token: the start of `endless`'s reply, after "a", " ", "ba", " b".
_AB = [" ab", "ab", " a", "aa", "bb", "aba", "abb", " bb", " bab", "aaaa", " aa", " abb", "aaa", "bab", "bbb",
       " aba", " aaa", "bbbb", "aab", "b"]


def endless(tok) -> list:
    """A reply that starts "a ba b" and goes on without end (until max_tokens or a cancel): its first 70
    characters are a's, b's and spaces, then come 1,100 different words; a cycle longer than any period
    the loop guard looks for, with no line or sentence ending in it."""
    start = ids_of(tok, ["a", " ", "ba", " b"] + _AB)
    assert len(start) == 4 + len(_AB), "each piece must be one token"
    words = [i for i in range(1000, 60000) if re.fullmatch(r" [a-z]{3,}", tok.decode([i])) and i not in start][:1100]
    return start + words + start[:1]


def successors(*scripts) -> dict:
    """Each script is a token-id sequence; returns token -> next token, refusing a second successor."""
    succ = {}
    for s in scripts:
        for a, b in zip(s, s[1:]):
            if succ.setdefault(a, b) != b:
                raise ValueError(f"token {a} would need two successors ({succ[a]} and {b}); change the script")
    return succ


@lru_cache(maxsize=2)
def _embedding(seed: int):
    emb = np.random.default_rng(seed + 1000).standard_normal((VOCAB, H)).astype(np.float32)
    emb[:, 0] = 1.0  # a shared direction: what unmapped tokens see, and the head maps it to <|im_end|>
    return emb, emb / np.sqrt((emb**2).mean(axis=1, keepdims=True) + 1e-6)


def build(folder, succ: dict, *, max_position_embeddings=4096, template=None, generation_config=None, seed=0,
          heads=2, layers=1, rope_scaling=None):
    """Write the checkpoint (with the real tokenizer) and check that greedy decoding follows `succ`.
    `heads` (query heads; one key/value head) and `layers`: to split the model across ranks."""
    rng = np.random.default_rng(seed)
    emb, normed = _embedding(seed)
    head = np.zeros((VOCAB, H), np.float32)
    tok = tokenizer()
    head[tok.token_id("<|im_end|>"), 0] = 4.0
    for a, b in succ.items():
        r = emb[a, 1:]
        head[b, 1:] += r / np.linalg.norm(r)
    head *= SHARPNESS
    pairs = np.array(list(succ.items()), dtype=np.int64).reshape(-1, 2)
    for i in range(0, len(pairs), 64):  # in blocks: the head is read once per block, not once per token
        a, b = pairs[i : i + 64].T
        ok = (np.argmax(normed[a] @ head.T, axis=1) == b).all()
        assert ok, "the random embedding broke the chain; change the seed"

    small = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32) * 0.1)
    weights = {"model.embed_tokens.weight": mx.array(emb), "lm_head.weight": mx.array(head),
               "model.norm.weight": mx.ones(H)}
    for i in range(layers):
        p = f"model.layers.{i}"
        weights.update({
            f"{p}.input_layernorm.weight": mx.ones(H), f"{p}.post_attention_layernorm.weight": mx.ones(H),
            f"{p}.self_attn.q_proj.weight": small(32 * heads, H), f"{p}.self_attn.k_proj.weight": small(32, H),
            f"{p}.self_attn.v_proj.weight": small(32, H), f"{p}.self_attn.o_proj.weight": mx.zeros((H, 32 * heads)),
            f"{p}.self_attn.q_norm.weight": mx.ones(32), f"{p}.self_attn.k_norm.weight": mx.ones(32),
            f"{p}.mlp.gate_proj.weight": small(32, H), f"{p}.mlp.up_proj.weight": small(32, H),
            f"{p}.mlp.down_proj.weight": mx.zeros((H, 32)),
        })
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    config = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=H, intermediate_size=32,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1, head_dim=32,
                  vocab_size=VOCAB, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=False)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    (folder / "config.json").write_text(json.dumps(config))
    copy_tokenizer(folder)
    gen = {"eos_token_id": [151645, 151643], "temperature": 0.6, "top_p": 0.95, "top_k": 20}
    (folder / "generation_config.json").write_text(json.dumps(generation_config or gen))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


def qwq_template() -> str:
    """Qwen3's template with the reply opened inside <think>, as QwQ-32B's template does."""
    cfg = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    return cfg["chat_template"].replace("{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}")

