"""Batched decoding (decode.py): rows decoded together give each the tokens it gets alone (greedy, seeded,
with penalties, 16-bit and quantized caches), join and leave at any step, and a cancelled row leaves at once;
the server decodes its requests together (one forward pass per step for all of them)."""

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import pytest
from checkpoints import random_mlx_model
from conftest import NAME

from mlx_qwen3.decode import Decoder, Taker, generate_step
from mlx_qwen3.generate import Generation, prepare, stream_generate
from mlx_qwen3.models.cache import CacheSetting, PromptCache
from mlx_qwen3.sample import make_processors, make_sampler

NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
CONFIG = dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, vocab_size=151936,
              max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=False)


def random_model(seed: int = 0, **overrides):
    """A random tiny Qwen3 with Qwen3's vocabulary (the real tokenizer's ids all fit)."""
    return random_mlx_model({**CONFIG, **overrides}, seed)


@pytest.fixture(scope="module")
def random():
    return random_model()


# (kv setting, sampling, penalties) per row: greedy and seeded draws, 16-bit and 8-bit caches, penalties
ROWS = [(CacheSetting(), dict(temperature=0.0), {}),
        (CacheSetting(8), dict(temperature=0.0), {}),
        (CacheSetting(), dict(temperature=1.0, top_k=20, seed=7), {}),
        (CacheSetting(), dict(temperature=0.0), dict(presence=1.5))]


def row_spec(i: int):
    setting, sampling, penalties = ROWS[i % len(ROWS)]
    ids = [(37 * i + 11 * j) % 5000 + 100 for j in range(5 + 3 * i)]  # prompts of 5 to 50 tokens
    return ids, setting, sampling, penalties, 6 + (i % 5) * 3  # rows leave after 6 to 18 tokens


def alone(model, i: int) -> list:
    ids, setting, sampling, penalties, n = row_spec(i)
    sampling = dict(sampling)
    t = sampling.pop("temperature")
    steps = generate_step(model, mx.array(ids, dtype=mx.uint32), PromptCache.new(model, setting),
                          make_sampler(t, **sampling), make_processors(**penalties))
    return [next(steps) for _ in range(n)]


def together(model, count: int, join_at: dict) -> tuple:
    """Rows 0.. decoded in one Decoder, row i joining at step join_at.get(i, 0) and leaving after its n
    tokens; -> (each row's tokens, the decoder's passes, the most rows any one pass held)."""
    decoder, takers, caches, widest = Decoder(model), {}, {}, 0
    step = 0
    while step == 0 or decoder.rows:
        for i in range(count):
            if join_at.get(i, 0) == step:
                ids, setting, sampling, penalties, n = row_spec(i)
                sampling = dict(sampling)
                t = sampling.pop("temperature")
                takers[i], caches[i] = Limited(n), PromptCache.new(model, setting)
                decoder.add(ids, caches[i], make_sampler(t, **sampling), make_processors(**penalties), takers[i])
        widest = max(widest, sum(r.y is not None for r in decoder.rows))
        decoder.step()
        step += 1
    for i, cache in caches.items():
        assert cache.consistent and len(cache.ids) == len(row_spec(i)[0]) + len(takers[i].taken)
    return [takers[i].taken for i in range(count)], decoder.passes, widest


class Limited(Taker):
    """Takes `n` tokens, then ends the row."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def take(self, token: int) -> bool:
        self.taken.append(token)
        return len(self.taken) < self.n


@pytest.mark.parametrize("join_at", [{}, {i: 2 * i for i in range(16)}], ids=["at-once", "staggered"])
def test_sixteen_rows_decode_as_each_alone(random, join_at):
    tokens, passes, widest = together(random, 16, join_at)
    assert tokens == [alone(random, i) for i in range(16)]
    generated = sum(len(t) for t in tokens)
    assert widest == 16 if not join_at else widest >= 5  # rows joined and left while others decoded
    assert passes < generated / 2  # rows shared passes (a time-sliced loop makes one per token)
    if not join_at:  # the 16 prompts in one pass, then one pass per token of the longest reply (and its end)
        assert passes == 1 + max(len(t) for t in tokens) + 1


def test_sixteen_replies_in_one_decoder_give_the_text_each_gets_alone(answering, looping):
    """Text level, on the scripted models: thinking, answers, a stop string, max_tokens, side by side."""
    for model, tok in (answering, looping):
        prompts = [prepare(model, tok, f"{i} + {i}?", max_tokens=4 + i, temperature=0,
                           stop=["ba b"] if i % 3 == 0 else (), enable_thinking=i % 2 == 0) for i in range(16)]
        decoder = Decoder(model)
        generations = [Generation(decoder, tok, p) for p in prompts]
        texts = ["" for _ in prompts]
        while decoder.rows:
            decoder.step()
            for i, g in enumerate(generations):
                texts[i] += "".join(e.text for e in g.drain())
        results = [g.result() for g in generations]
        for i, p in enumerate(prompts):
            *events, result = stream_generate(model, tok, p)
            assert texts[i] == "".join(e.text for e in events)
            assert (results[i].answer, results[i].thinking, results[i].finish_reason, results[i].generation_tokens) == \
                   (result.answer, result.thinking, result.finish_reason, result.generation_tokens)


def test_a_cancelled_row_leaves_at_its_next_token_and_the_others_go_on(random):
    decoder, cancel = Decoder(random), threading.Event()
    stays, leaves = Limited(12), Limited(1000)
    kept = PromptCache.new(random)
    decoder.add([5, 6, 7], kept, make_sampler(0.0), taker=stays)
    gone = PromptCache.new(random)
    decoder.add([8, 9], gone, make_sampler(0.0), taker=leaves, cancel=cancel)
    for _ in range(4):
        decoder.step()
    cancel.set()
    decoder.step()
    assert len(decoder.rows) == 1 and gone.consistent  # its slot is free, its cache whole
    while decoder.rows:
        decoder.step()
    assert stays.taken == [next(s) for s in [generate_step(random, mx.array([5, 6, 7]), PromptCache.new(random),
                                                           make_sampler(0.0))] for _ in range(12)]


def test_a_long_prompt_joins_in_chunks_while_the_others_decode(random, monkeypatch):
    import mlx_qwen3.decode as decode

    monkeypatch.setattr(decode, "PREFILL_CHUNK", 16)
    decoder = Decoder(random)
    first = Limited(30)
    decoder.add([1, 2, 3], PromptCache.new(random), make_sampler(0.0), taker=first)
    decoder.step()
    decoder.step()
    long_ids = list(range(200, 300))
    late = Limited(5)
    decoder.add(long_ids, PromptCache.new(random), make_sampler(0.0), taker=late)
    counts, first_token_at = [], None
    while decoder.rows:
        decoder.step()
        counts.append(len(first.taken))
        if late.taken and first_token_at is None:
            first_token_at = len(counts)
    # the 100-token prompt took 7 steps (6 chunks of 16, then 3 and its last token in the shared pass), its
    # first token came out of that pass (taken at the next), and the first row got a token at every step
    assert first_token_at == 8
    assert [b - a for a, b in zip(counts, counts[1:8])] == [1] * 7
    assert late.taken == [next(s) for s in [generate_step(random, mx.array(long_ids), PromptCache.new(random),
                                                          make_sampler(0.0))] for _ in range(5)]


def test_the_server_decodes_sixteen_clients_together(answering, serve):
    with serve(*answering) as url:
        def ask(i):
            body = {"model": NAME, "messages": [{"role": "user", "content": f"{i} + {i}?"}], "temperature": 0}
            return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()

        alone_reply = ask(0)
        before = httpx.get(f"{url}/health").json()["decoding"]
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(ask, range(16)))
        after = httpx.get(f"{url}/health").json()["decoding"]
    assert [r["choices"][0]["message"] for r in replies] == [alone_reply["choices"][0]["message"]] * 16
    passes = after["forward_passes"] - before["forward_passes"]
    tokens = after["generated_tokens"] - before["generated_tokens"]
    # each reply's tokens and its end (<|im_end|>, sampled too)
    assert tokens == 16 * (alone_reply["usage"]["completion_tokens"] + 1) and after["batch_width"] == 16
    assert passes < tokens / 2  # the time-sliced server made one pass per token
