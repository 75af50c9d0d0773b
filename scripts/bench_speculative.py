"""Benchmark: decode tok/s with and without speculative decoding, and tokens per target pass (issue 15).

Random weights never copy and never agree with a draft, so the models here are "chains" (as tests/chain.py
builds them): layers whose o_proj and down_proj are zero carry the token embedding to a head that maps each
token of a script to the next, so greedy decoding follows the script. The matmuls run whatever the zeros:
the target costs a pass of Qwen3-0.6B's layer shapes (16 of its 28 layers, its 151,936-row head), the draft
a few small layers. Cases:
  (a) copy-heavy, as a code edit is: the prompt holds a text, the reply repeats it with a few tokens changed;
      prompt lookup, no draft model;
  (b) a draft model whose successors are the target's on ~90% of the script's tokens;
  (c) a draft whose successors are all wrong: the overhead of drafting ("auto" backs off; a fixed num_draft
      for contrast).
Greedy throughout; every drafted output is checked to be the plain output's tokens. mlx-lm's draft-model
mode runs case (b)'s pair as the peer. Everything is built in a temporary folder, removed at the end.
Prints one JSON object.

    python scripts/bench_speculative.py [--words 64] [--repeat 1]
"""

import argparse
import json
import math
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "qwen3-tokenizer"
VOCAB = 151936
IM_END = 151645  # Qwen3's <|im_end|>
SHARPNESS = 5.0  # the head's scale (as tests/chain.py): a mapped token's successor wins by a wide margin
PREFILL_CHUNK = 512  # decode.PREFILL_CHUNK: forward_passes counts a prompt's chunks, we take them out
# Qwen3-0.6B's layer shapes, 16 of its 28 layers (untied head: the chain's head is not its embedding)
TARGET = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=16,
              num_key_value_heads=8, head_dim=128)
DRAFT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)
EDIT = 8  # tokens the code edit of case (a) changes, in the middle of the text
MISS_EVERY = 10  # case (b): the draft's successor is wrong for one script token in this many


def build(folder: Path, shape: dict, succ: dict, seed: int) -> Path:
    """A bf16 chain checkpoint (with the real tokenizer) whose greedy decoding maps each key of `succ` to its
    value; an unmapped token goes to <|im_end|> (the shared direction of column 0)."""
    rng = np.random.default_rng(seed)
    H, I, D = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * D, shape["num_key_value_heads"] * D
    emb = rng.standard_normal((VOCAB, H), dtype=np.float32)
    emb[:, 0] = 1.0
    head = np.zeros((VOCAB, H), np.float32)
    head[IM_END, 0] = 4.0
    for a, b in succ.items():
        r = emb[a, 1:]
        head[b, 1:] += r / np.linalg.norm(r)
    head *= SHARPNESS
    bf16 = lambda a: mx.array(a).astype(mx.bfloat16)  # noqa: E731
    small = lambda *s: bf16(rng.standard_normal(s, dtype=np.float32) * 0.02)  # noqa: E731
    ones = lambda n: mx.ones(n, dtype=mx.bfloat16)  # noqa: E731
    zeros = lambda *s: mx.zeros(s, dtype=mx.bfloat16)  # noqa: E731
    weights = {"model.embed_tokens.weight": bf16(emb), "lm_head.weight": bf16(head), "model.norm.weight": ones(H)}
    del emb, head
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights.update({
            f"{p}.input_layernorm.weight": ones(H), f"{p}.post_attention_layernorm.weight": ones(H),
            f"{p}.self_attn.q_proj.weight": small(q, H), f"{p}.self_attn.k_proj.weight": small(kv, H),
            f"{p}.self_attn.v_proj.weight": small(kv, H), f"{p}.self_attn.o_proj.weight": zeros(H, q),
            f"{p}.self_attn.q_norm.weight": ones(D), f"{p}.self_attn.k_norm.weight": ones(D),
            f"{p}.mlp.gate_proj.weight": small(I, H), f"{p}.mlp.up_proj.weight": small(I, H),
            f"{p}.mlp.down_proj.weight": zeros(H, I),
        })
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=VOCAB,
                  max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=False, torch_dtype="bfloat16", **shape)
    (folder / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, folder / f)
    gen = {"eos_token_id": [IM_END, 151643], "temperature": 0.6, "top_p": 0.95, "top_k": 20}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def words(tok, n: int) -> list:
    """n distinct one-token words that encode back to themselves (a chain token has one successor, so no
    token may repeat in a script)."""
    out = []
    for i in range(1000, 100000):
        w = tok.decode([i])
        if re.fullmatch(r" [a-z]{3,}", w) and tok.encode(w) == [i]:
            out.append(i)
            if len(out) == n:
                return out
    raise SystemExit(f"error: the tokenizer has fewer than {n} one-token words; ask for fewer with --words")


def prompt_ids(tok, text: str) -> list:
    messages = [{"role": "user", "content": text}]
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False))


def parameters(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


def ms_per_pass(model, context: int = 256, steps: int = 8) -> float:
    """One token after `context` (a decode step), and the same at 5 tokens (a verify pass of 4 drafts)."""
    from mlx_qwen3.models.cache import PromptCache

    out = {}
    for width in (1, 5):
        cache = PromptCache.new(model)
        mx.eval(model(mx.zeros((1, context), dtype=mx.uint32), cache=cache.layers))
        ids = mx.zeros((1, width), dtype=mx.uint32)
        mx.eval(model(ids, cache=cache.layers))  # warm
        tic = time.perf_counter()
        for _ in range(steps):
            mx.eval(model(ids, cache=cache.layers))
        out[f"ms_{width}_token" + ("s" if width > 1 else "")] = 1000 * (time.perf_counter() - tic) / steps
    return out


def run(model, tok, text: str, draft=None, max_tokens=4096, **options) -> dict:
    """Greedy generation for a user message; its figures and the ids it leaves in the cache (prompt, reply,
    the <|im_end|> that ends it)."""
    from mlx_qwen3.generate import generate
    from mlx_qwen3.models.cache import PromptCache

    cache = PromptCache.new(model)
    r = generate(model, tok, text, cache=cache, draft_model=draft, temperature=0, enable_thinking=False,
                 max_tokens=max_tokens, **options)
    chunks = math.ceil((r.prompt_tokens - 1) / PREFILL_CHUNK)  # the passes before the prompt's last token
    decode_passes = r.forward_passes - chunks
    return {"decode_tps": r.generation_tps, "generation_tokens": r.generation_tokens,
            "decode_passes": decode_passes, "tokens_per_pass": r.generation_tokens / decode_passes,
            "drafted_tokens": r.drafted_tokens, "accepted_tokens": r.accepted_tokens,
            "acceptance": r.accepted_tokens / r.drafted_tokens if r.drafted_tokens else None,
            "finish_reason": r.finish_reason, "ids": list(cache.ids)}


def rounds(repeat: int, model, tok, plan: dict) -> dict:
    """Every run of `plan` (name -> (text, draft, options)) once per round, so a change in the machine's load
    falls on all of them alike; the median decode tok/s of each (the other figures do not vary)."""
    runs = {name: [] for name in plan}
    for _ in range(repeat):
        for name, (text, draft, options) in plan.items():
            runs[name].append(run(model, tok, text, draft, **options))
    return {name: {**rs[0], "decode_tps": statistics.median(r["decode_tps"] for r in rs)} for name, rs in runs.items()}


def case(plain: dict, variants: dict) -> dict:
    """Each variant against the plain run: ratio of decode tok/s and whether its tokens are the plain ones."""
    out = {"plain": {k: v for k, v in plain.items() if k != "ids"}}
    for name, r in variants.items():
        out[name] = {k: v for k, v in r.items() if k != "ids"}
        out[name]["ratio_tps"] = r["decode_tps"] / plain["decode_tps"]
        out[name]["same_output"] = r["ids"] == plain["ids"]
    return out


def draft_agreement(draft, ids: list, target_succ: dict) -> float:
    """Of the script's tokens, the share where the draft's greedy successor (one pass over them) is the
    target's: what the draft actually learned, not what we asked of it."""
    logits = draft(mx.array(ids, dtype=mx.uint32)[None])[0]
    predicted = mx.argmax(logits, axis=-1).tolist()
    return sum(predicted[i] == target_succ[t] for i, t in enumerate(ids)) / len(ids)


def mlx_lm_peer(folder: Path, draft_folder: Path, ids: list, script: list, num_draft: int) -> dict:
    """mlx-lm's draft-model mode on case (b)'s pair (its stream_generate(..., draft_model=...)), and
    without the draft: decode tok/s (its own generation_tps) and whether it produced the script."""
    try:
        from mlx_lm import load as mlx_lm_load
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        model, tokenizer = mlx_lm_load(str(folder))
        draft, _ = mlx_lm_load(str(draft_folder))
        out = {}
        for name, d in (("plain", None), ("draft", draft)):
            tokens, last = [], None
            kwargs = {} if d is None else {"draft_model": d, "num_draft_tokens": num_draft}
            for last in stream_generate(model, tokenizer, ids, max_tokens=len(script) + 1,
                                        sampler=make_sampler(0.0), **kwargs):
                tokens.append(last.token)
            out[name] = {"decode_tps": last.generation_tps, "generation_tokens": last.generation_tokens,
                         "follows_script": tokens[: len(script)] == script}
        out["draft"]["num_draft_tokens"] = num_draft
        out["ratio_tps"] = out["draft"]["decode_tps"] / out["plain"]["decode_tps"]
        return out
    except Exception as e:  # a peer that cannot run is reported, not fatal
        return {"error": f"{type(e).__name__}: {e}"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--words", type=int, default=64,
                    help="the script's length in tokens (every case's reply); 64: a run of about 5 minutes on 2 cores")
    ap.add_argument("--repeat", type=int, default=1, help="runs per figure (the median is kept)")
    ap.add_argument("--fixed-draft", type=int, default=4, help="the fixed num_draft shown beside auto")
    args = ap.parse_args()
    if not (TOKENIZER / "tokenizer.json").is_file():
        raise SystemExit(f"error: the Qwen3 tokenizer is not at {TOKENIZER}; put it there (../shared/qwen3-tokenizer)")
    if args.words < 4 * EDIT or args.repeat < 1 or not 1 <= args.fixed_draft <= 16:
        raise SystemExit(f"error: give --words >= {4 * EDIT}, --repeat >= 1 and --fixed-draft from 1 to 16")

    from mlx_qwen3 import load
    from mlx_qwen3.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(TOKENIZER)
    if tok.token_id("<|im_end|>") != IM_END:
        raise SystemExit(f"error: {TOKENIZER} is not Qwen3's tokenizer (<|im_end|> is not {IM_END})")
    pool = words(tok, args.words + EDIT)
    original = pool[: args.words]
    # the code edit: EDIT tokens in the middle replaced; the reply (every case's script) is the edited text
    mid = args.words // 2
    script = original[:mid] + pool[args.words:] + original[mid + EDIT:]
    copy_text = "Rename the eight words in the middle and give the whole text back:" + tok.decode(original)
    short_text = "Write the text."
    copy_prompt, short_prompt = prompt_ids(tok, copy_text), prompt_ids(tok, short_text)
    if copy_prompt[-1] != short_prompt[-1] or not any(copy_prompt[i:i + len(original)] == original
                                                      for i in range(len(copy_prompt))):
        raise SystemExit("error: the prompts do not tokenize as this benchmark expects (its text, its last token)")
    start = short_prompt[-1]  # both prompts end with it: the reply's first token follows it
    chain = [start] + script + [IM_END]
    target_succ = dict(zip(chain, chain[1:]))
    # (b): the target's successors except one in MISS_EVERY, which skips a token (still a chain of the
    # script: the draft goes on drafting after a miss); (c): every successor skips one
    rng = np.random.default_rng(7)
    misses = set(rng.choice(len(script) - 2, size=len(script) // MISS_EVERY, replace=False).tolist())
    close_succ, wrong_succ = dict(target_succ), {}
    for i, t in enumerate(script):
        skip = script[i + 2] if i + 2 < len(script) else script[0]
        wrong_succ[t] = skip
        if i in misses:
            close_succ[t] = skip
    wrong_succ[start] = script[1]

    work = Path(tempfile.mkdtemp(prefix="bench_speculative_"))
    try:
        tic = time.perf_counter()
        folders = {"target": build(work / "target", TARGET, target_succ, 0),
                   "close": build(work / "close", DRAFT, close_succ, 1),
                   "wrong": build(work / "wrong", DRAFT, wrong_succ, 2)}
        model, tok = load(folders["target"])
        close, _ = load(folders["close"])
        wrong, _ = load(folders["wrong"])
        build_s = time.perf_counter() - tic
        models = {}
        for name, m, shape in (("target", model, TARGET), ("draft", close, DRAFT)):  # both drafts: one shape
            models[name] = {**shape, "parameters": parameters(m), "dtype": "bfloat16", **ms_per_pass(m)}
        agreement = {"close": draft_agreement(close, [start] + script, target_succ),
                     "wrong": draft_agreement(wrong, [start] + script, target_succ)}

        run(model, tok, "hi", close, num_draft=2, max_tokens=8)  # warm up
        fixed = args.fixed_draft
        got = rounds(args.repeat, model, tok, {
            "plain_copy": (copy_text, None, {}), "lookup_auto": (copy_text, None, {"prompt_lookup": True}),
            "plain": (short_text, None, {}),
            "close_auto": (short_text, close, {}), "close_fixed": (short_text, close, {"num_draft": fixed}),
            "wrong_auto": (short_text, wrong, {}), "wrong_fixed": (short_text, wrong, {"num_draft": fixed})})
        plain_copy, plain = got["plain_copy"], got["plain"]
        follows = {"copy": plain_copy["ids"] == copy_prompt + script + [IM_END],
                   "short": plain["ids"] == short_prompt + script + [IM_END]}
        cases = {
            "a_prompt_lookup": case(plain_copy, {"lookup_auto": got["lookup_auto"]}),
            "b_close_draft": case(plain, {"draft_auto": got["close_auto"], f"draft_fixed_{fixed}": got["close_fixed"]}),
            "c_wrong_draft": case(plain, {"draft_auto": got["wrong_auto"], f"draft_fixed_{fixed}": got["wrong_fixed"]}),
        }
        c = cases["c_wrong_draft"]
        c["overhead_auto"] = 1 - c["draft_auto"]["ratio_tps"]
        c["overhead_under_10_percent"] = c["overhead_auto"] < 0.10
        peer = mlx_lm_peer(folders["target"], folders["close"], short_prompt, script, fixed)
        total_s = time.perf_counter() - tic
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(json.dumps({
        "device": str(mx.default_device()),
        "models": {
            "how": "chains (tests/chain.py's construction): o_proj and down_proj zero, so the token embedding "
                   "reaches a head mapping each script token to the next; the matmuls run all the same",
            **models,
            "draft_agreement_with_target": agreement,  # measured: the drafts' greedy successors on the script
        },
        "script": {"tokens": len(script), "text": "distinct one-token words (a chain token has one successor)",
                   "edit": f"case (a): {EDIT} tokens changed at token {mid} of the text the prompt holds",
                   "copy_prompt_tokens": len(copy_prompt), "short_prompt_tokens": len(short_prompt),
                   "plain_follows_script": follows},
        "measure": "decode_tps: GenerationResult.generation_tps (from the first generated token to the end); "
                   "tokens_per_pass: generation_tokens / decode passes, where decode passes = forward_passes "
                   f"minus the prompt's ceil((prompt_tokens - 1) / {PREFILL_CHUNK}) chunks before its last token "
                   "(the pass that feeds it counts, as does the one that reads <|im_end|>: plain decoding "
                   "scores just under 1); greedy; median of --repeat rounds (each round runs every case once)",
        "repeat": args.repeat,
        **cases,
        "mlx_lm_b_close_draft": peer,
        "cuda": "not run: no GPU lent to this session",
        "build_seconds": build_s,
        "total_seconds": total_s,
    }))


if __name__ == "__main__":
    main()
