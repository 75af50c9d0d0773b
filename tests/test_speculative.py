"""Speculative decoding (decode.py): with a draft model or prompt lookup, greedy output is token for token
the output without drafts (random and scripted checkpoints: a thought that ends, a tool call, a stop string
inside a draft, a thinking budget), the caches hold exactly what plain decoding leaves (16-bit and 8-bit),
drafts stop at a boundary, and the result counts drafted and accepted tokens. The distribution of sampled
output: tests/test_speculative_sampling.py."""

import copy
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import NAME
from test_batch import random_model

from mlx_qwen3.decode import Decoder, Drafter
from mlx_qwen3.generate import generate, prepare
from mlx_qwen3.models.cache import CacheSetting, PromptCache

@pytest.fixture(scope="module")
def models():
    """A random target, and drafts that always agree (itself), mostly agree (8-bit) and seldom (another)."""
    target = random_model(0)
    close = copy.deepcopy(target)
    nn.quantize(close, group_size=32, bits=4)
    return target, {"same": target, "close": close, "other": random_model(1)}


def tokens(model, prompt_ids: list, n: int, draft=None, setting=CacheSetting(), presence=0.0, **drafting) -> tuple:
    """Greedy ids of `n` generated tokens (a Reply-free row) and the row's cache and drafter."""
    from mlx_qwen3.options import Drafting
    from mlx_qwen3.sample import make_processors, make_sampler
    from test_batch import Limited

    decoder, taker = Decoder(model, draft), Limited(n)
    cache = PromptCache.new(model, setting)
    row = decoder.add(prompt_ids, cache, make_sampler(0.0), make_processors(presence), taker=taker,
                      drafting=Drafting(**drafting) if drafting or draft is not None else None,
                      draft_sampler=make_sampler(0.0))
    while decoder.rows:
        decoder.step()
    return taker.taken, cache, row


PROMPT = [(7 * j) % 900 + 50 for j in range(40)]


@pytest.mark.parametrize("kind", ["same", "close", "other"])
def test_a_draft_model_changes_no_greedy_token(models, kind):
    target, drafts = models
    plain, _, _ = tokens(target, PROMPT, 40)
    drafted, _, row = tokens(target, PROMPT, 40, drafts[kind])
    assert drafted == plain
    d = row.drafter
    assert d.drafted > 0
    if kind == "same":
        assert d.accepted == d.drafted  # it agrees everywhere
    if kind == "other":
        assert d.accepted < d.drafted / 2


def test_penalties_count_the_drafts_before_each_position(models):
    target, drafts = models
    plain, _, _ = tokens(target, PROMPT, 30, presence=2.0)
    assert plain != tokens(target, PROMPT, 30)[0]  # the penalty changes the reply
    drafted, _, row = tokens(target, PROMPT, 30, drafts["same"], presence=2.0)
    assert drafted == plain and row.drafter.accepted > 0


def test_prompt_lookup_drafts_what_the_context_repeats(looping):
    """The scripted model is a chain (each token's successor is fixed), so what followed an n-gram before
    follows it again: lookup's drafts are accepted, several tokens per pass."""
    model, tok = looping
    start = prepare(model, tok, "go", enable_thinking=False).ids
    plain, _, _ = tokens(model, start, 200)
    context = start + plain[:150] + start
    drafted, _, row = tokens(model, context, 100, prompt_lookup=True)
    assert drafted == plain[:100]
    assert row.drafter.accepted >= 80 and row.passes < 30
    # a copy with every 7th token changed: drafts rejected there, the same tokens all the same
    wrong = [t if i % 7 else plain[(i + 50) % 150] for i, t in enumerate(plain[:150])]
    drafted, cache, row = tokens(model, start + wrong + start, 100, model, prompt_lookup=True, num_draft=8)
    assert drafted == plain[:100] and cache.consistent
    assert 0 < row.drafter.accepted < row.drafter.drafted


@pytest.mark.parametrize("setting", [CacheSetting(), CacheSetting(8), CacheSetting(8, kv_start=45)],
                         ids=["16-bit", "8-bit", "8-bit-from-45"])
def test_rejected_drafts_are_rewound_exactly(models, setting):
    target, drafts = models
    plain, plain_cache, _ = tokens(target, PROMPT, 24, setting=setting)
    drafted, cache, row = tokens(target, PROMPT, 24, drafts["other"], setting=setting, num_draft=4)
    assert drafted == plain and row.drafter.drafted > row.drafter.accepted  # drafts were rejected
    assert cache.ids == plain_cache.ids and cache.consistent
    same_positions(cache, plain_cache)
    # the draft model's cache, rewound to what the context still shares with it, is what feeding it those
    # ids gives (its rewind waits for its next proposal: rewind it now the way that proposal would)
    draft_cache = row.drafter.cache
    draft_cache.reuse_for(cache.ids)
    fresh = PromptCache.new(drafts["other"])
    drafts["other"](mx.array(draft_cache.ids)[None], cache=fresh.layers)
    fresh.ids = list(draft_cache.ids)
    assert len(draft_cache.ids) > len(PROMPT) and draft_cache.consistent
    same_positions(draft_cache, fresh)


def same_positions(cache: PromptCache, other: PromptCache):
    for ours, theirs in zip(cache.layers, other.layers):
        assert ours.offset == theirs.offset
        for a, b in zip(ours.state, theirs.state):
            n = ours.offset
            np.testing.assert_allclose(np.array(a[..., :n, :].astype(mx.float32)),
                                       np.array(b[..., :n, :].astype(mx.float32)), atol=2e-3, rtol=1e-3)


def test_drafts_stop_at_a_boundary():
    drafter = Drafter(8, lookup=True)
    context = [1, 2, 3, 9, 4, 5, 6, 7, 1, 2]  # "1 2" was followed by 3 9 4 5 ...
    drafts, probs = drafter.propose(context[:-1], context[-1], room=8, boundaries=frozenset({9}))
    assert drafts == [3, 9] and probs is None  # up to the boundary, itself included, never past it
    assert drafter.propose(context + [3, 9], 4, room=1, boundaries=frozenset())[0] == [5]  # room caps it


def replies(model, tok, draft, prompts, **options):
    out = []
    for p in prompts:
        r = generate(model, tok, p, temperature=0, draft_model=draft, **options)
        out.append((r.thinking, r.answer, r.tool_calls, r.finish_reason, r.generation_tokens))
    return out


def test_scripted_replies_are_the_same_with_drafts(answering, tool_model, looping):
    """A thought that ends, a tool call, a stop string inside a draft, a thinking budget that forces the
    thought's end in the middle of accepted drafts: the same replies with a draft that agrees, and with
    prompt lookup."""
    cases = [(answering, ["2+2?", "Let me think The answer is 4. 2+2?"], {}),
             (answering, ["2+2?"], dict(thinking_budget=1)),
             (tool_model, ["call f"], {}),
             (looping, ["go"], dict(stop=["ba b"], max_tokens=30, enable_thinking=False)),
             (looping, ["go"], dict(max_tokens=40, enable_thinking=False))]
    for (model, tok), prompts, options in cases:
        plain = replies(model, tok, None, prompts, **options)
        assert replies(model, tok, model, prompts, **options) == plain
        assert replies(model, tok, None, prompts, prompt_lookup=True, **options) == plain
        assert replies(model, tok, model, prompts, prompt_lookup=True, num_draft=3, **options) == plain


def test_the_result_counts_drafts_and_passes(answering):
    model, tok = answering
    plain = generate(model, tok, "2+2?", temperature=0)
    assert (plain.drafted_tokens, plain.accepted_tokens) == (0, 0)
    assert plain.forward_passes >= plain.generation_tokens
    drafted = generate(model, tok, "2+2?", temperature=0, draft_model=model)
    assert drafted.answer == plain.answer and drafted.accepted_tokens == drafted.drafted_tokens > 0
    assert drafted.forward_passes < plain.forward_passes


def test_the_server_drafts_and_batches_at_once(answering, serve):
    model, tok = answering
    with serve(model, tok, draft_model=model, prompt_lookup=True) as url:
        def ask(i):
            body = {"model": NAME, "messages": [{"role": "user", "content": f"{i} + {i}?"}], "temperature": 0}
            return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, range(8)))
        decoding = httpx.get(f"{url}/health").json()["decoding"]
        # a request may turn drafting off
        body = {"messages": [{"role": "user", "content": "1 + 1?"}], "temperature": 0, "prompt_lookup": False}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    alone = generate(model, tok, "0 + 0?", temperature=0)
    assert all(r["choices"][0]["message"]["content"] == alone.answer for r in got)
    assert decoding["forward_passes"] < decoding["generated_tokens"] / 2


def test_the_cli_drafts_and_says_how_many_were_accepted(thinking_dir, tmp_path):
    """One run: --draft-model with --prompt-lookup prints the reply plain decoding prints (same model as
    draft: every draft accepted), its stats line counts them, and a draft model of another vocabulary, or
    a bad --num-draft, is one line and exit 2."""
    import json
    import shutil
    import subprocess
    import sys

    def cli(*args):
        cmd = [sys.executable, "-m", "mlx_qwen3.generate", "--model", str(thinking_dir), "--temp", "0", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    plain = generate(*__import__("mlx_qwen3").load(thinking_dir), "2+2?", temperature=0)
    out = cli("--prompt", "2+2?", "--draft-model", str(thinking_dir), "--prompt-lookup", "--json")
    assert out.returncode == 0, out.stderr
    done = json.loads(out.stdout.splitlines()[-1])
    assert (done["answer"], done["thinking"]) == (plain.answer, plain.thinking)
    assert done["accepted_tokens"] == done["drafted_tokens"] > 0

    other = tmp_path / "other-vocabulary"
    shutil.copytree(thinking_dir, other)
    tokenizer_json = json.loads((other / "tokenizer.json").read_text())
    tokenizer_json["added_tokens"].append({**tokenizer_json["added_tokens"][-1], "id": 151700, "content": "<x>"})
    (other / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    for bad, phrase in (((other,), "another vocabulary"), ((thinking_dir, "--num-draft", "x"), "--num-draft"),
                        ((thinking_dir, "--num-draft", "40"), "num_draft")):
        out = cli("--prompt", "2+2?", "--draft-model", str(bad[0]), *bad[1:])
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and phrase in out.stderr, out.stderr
