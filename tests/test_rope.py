"""Automatic YaRN (models/rope.py): plain RoPE while a context fits the original window, else YaRN at the
smallest power-of-two factor that covers it; a cache fixes its factor; a conversation that outgrows it is
processed again, once. Logits against transformers configured with the corresponding rope_scaling."""

import copy
import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from chain import build as build_scripted
from chain import ids_of, successors, tokenizer
from checkpoints import prompt, reference_logits, rel_err

from mlx_qwen3 import ChatSession, load, load_model
from mlx_qwen3.errors import UserError
from mlx_qwen3.decode import process_prompt
from mlx_qwen3.generate import generate, prepare
from mlx_qwen3.models import qwen3
from mlx_qwen3.models.cache import CacheSetting, PromptCachePool, make_cache

TOL = 1e-4  # fp32, relative to the largest logit
ORIGINAL = 32  # the test checkpoints' YaRN: original window 32, factor up to 4 (tests/checkpoints.py)


def args_of(**config):
    base = dict(model_type="qwen3", hidden_size=64, num_hidden_layers=1, intermediate_size=8, num_attention_heads=2,
                num_key_value_heads=1, rms_norm_eps=1e-6, vocab_size=10, max_position_embeddings=40960)
    return qwen3.ModelArgs.from_dict({**base, **config})


def test_qwen3_without_rope_scaling_gets_qwen_documented_yarn():
    args = args_of()  # Qwen3's config on the Hub: 40,960 positions, no rope_scaling
    assert args.context_window == 131072
    factors = {n: args.rope_factor(n) for n in (1, 32768, 32769, 65536, 65537, 131072)}
    assert factors == {1: 1.0, 32768: 1.0, 32769: 2.0, 65536: 2.0, 65537: 4.0, 131072: 4.0}
    static = args_of(rope_mode="config")  # today's behaviour: the config as it is
    assert static.context_window == 40960 and static.rope_factor(40000) == 1.0
    plain = args_of(rope_mode="plain")
    assert plain.context_window == 40960 and plain.rope_factor(100000) == 1.0


def test_a_configured_yarn_sets_the_window_and_the_ceiling():
    yarn = {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 1000}
    args = args_of(max_position_embeddings=3000, rope_scaling=yarn)
    assert [args.rope_factor(n) for n in (1000, 1001, 2000, 2001, 3000)] == [1.0, 2.0, 2.0, 3.0, 3.0]
    assert args.context_window == 3000
    assert args_of(max_position_embeddings=3000, rope_scaling=yarn, rope_mode="config").rope_factor(10) == 3.0
    assert args_of(max_position_embeddings=3000, rope_scaling=yarn, rope_mode="plain").context_window == 1000
    small = args_of(max_position_embeddings=4096)  # no documented YaRN below 32,768 positions: plain only
    assert small.context_window == 4096 and small.rope_factor(4096) == 1.0
    with pytest.raises(ValueError, match="rope must be one of auto, config, plain"):
        args_of(rope_mode="static")


def hf_at(hf, factor: float):
    """The transformers model `hf` with its rope_scaling set to YaRN at `factor` (1: none, plain RoPE)."""
    config = copy.deepcopy(hf.config)
    theta = config.rope_parameters["rope_theta"]
    config.rope_parameters = ({"rope_type": "default", "rope_theta": theta} if factor == 1 else
                              {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": ORIGINAL,
                               "rope_theta": theta})
    model = type(hf)(config).eval()
    model.load_state_dict(hf.state_dict())
    return model


@pytest.mark.parametrize("name", ["qwen3_tied_yarn", "qwen3_moe_yarn", "qwen2"])
def test_logits_equal_transformers_at_the_factor_of_each_length(checkpoint, name):
    folder, hf = checkpoint(name)
    model, _ = load_model(folder)
    for length, factor in ((20, 1.0), (50, 2.0), (100, 4.0)):
        assert model.args.rope_factor(length) == factor
        ids = prompt(1, length, seed=length)
        assert rel_err(model(mx.array(ids)), reference_logits(hf_at(hf, factor), ids)) < TOL, (length, factor)


def test_short_prompts_give_exactly_the_plain_rope_logits(checkpoint):
    folder, hf = checkpoint("qwen3_tied_yarn")
    auto, _ = load_model(folder)
    plain, _ = load_model(folder, rope="plain")
    ids = mx.array(prompt(1, ORIGINAL, seed=3))
    assert np.array_equal(np.array(auto(ids)), np.array(plain(ids)))
    static, _ = load_model(folder, rope="config")  # YaRN x4 at every length, as transformers' static config
    assert rel_err(static(ids), reference_logits(hf, np.array(ids))) < TOL
    assert rel_err(auto(ids), reference_logits(hf, np.array(ids))) > 100 * TOL  # what auto spares short prompts


def test_a_cache_fixes_its_factor(checkpoint):
    folder, hf = checkpoint("qwen3_tied_yarn")
    model, _ = load_model(folder)
    ids = prompt(1, 20, seed=4)  # short, but its cache was planned for a longer context
    logits = process_prompt(model, mx.array(ids), make_cache(model, rope_factor=2.0), chunk_size=7)
    assert rel_err(logits, reference_logits(hf_at(hf, 2.0), ids)[:, -1]) < TOL
    whole = process_prompt(model, mx.array(ids), make_cache(model))  # no plan: the whole window's factor
    assert rel_err(whole, reference_logits(hf_at(hf, 4.0), ids)[:, -1]) < TOL


def test_a_conversation_that_outgrows_its_factor_is_processed_again_once(checkpoint):
    folder, hf = checkpoint("qwen3_tied_yarn")
    model, _ = load_model(folder)
    ids = prompt(1, 60, seed=5)[0].tolist()
    pool = PromptCachePool(max_entries=4)

    def turn(n, factor):  # as the generator does it: the event is reported once
        cache = pool.start(model, ids[:n], CacheSetting(None, 0, factor))
        rescaled, cache.rescaled_from = cache.rescaled_from, None
        todo = cache.reuse_for(ids[:n])
        logits = process_prompt(model, mx.array([todo]), cache.layers)
        cache.ids.extend(todo)
        pool.put(cache)
        return rescaled, len(todo), cache.setting.rope_factor, logits

    assert turn(20, 1.0)[:3] == (None, 20, 1.0)
    assert turn(30, 1.0)[:3] == (None, 10, 1.0)  # the conversation goes on within the window: the new tokens
    *crossing, logits = turn(45, 2.0)  # planned past 32: processed again, whole, at factor 2
    assert crossing == [1.0, 45, 2.0]
    assert rel_err(logits, reference_logits(hf_at(hf, 2.0), np.array([ids[:45]]))[:, -1]) < TOL
    assert len(pool) == 1  # the outgrown cache left the pool
    *shorter, logits = turn(50, 1.0)  # planned shorter again: it keeps its larger factor, no ping-pong
    assert shorter == [None, 5, 2.0]
    assert rel_err(logits, reference_logits(hf_at(hf, 2.0), np.array([ids[:50]]))[:, -1]) < TOL
    other = pool.start(model, prompt(1, 40, seed=6)[0].tolist(), CacheSetting(None, 0, 4.0))
    assert other.rescaled_from is None  # another conversation: nothing outgrown


def test_prepare_plans_the_context_and_the_cache_follows(yarn_dir):
    model, tok = load(yarn_dir)
    short = prepare(model, tok, "hello", enable_thinking=False, max_tokens=4)
    assert short.setting.rope_factor == 1.0 and len(short.ids) + 4 <= ORIGINAL
    long = prepare(model, tok, "hello", enable_thinking=False, max_tokens=60)
    assert long.setting.rope_factor == 4.0
    with pytest.raises(UserError, match="> 256 maximum"):
        prepare(model, tok, "hello " * 300, enable_thinking=False)
    assert generate(model, tok, "hello", enable_thinking=False, temperature=0, max_tokens=60).rope_factor == 4.0


@pytest.fixture(scope="module")
def yarn_dir(tmp_path_factory):
    """A scripted model answering "Hi there!", with YaRN x4 over an original window of ORIGINAL tokens."""
    tok = tokenizer()
    tail = tok.encode(tok.apply_chat_template([{"role": "user", "content": "x"}], enable_thinking=False))[-1]
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
    return build_scripted(tmp_path_factory.mktemp("yarn") / "m",
                          successors([tail] + ids_of(tok, ["Hi there!", "<|im_end|>"])),
                          max_position_embeddings=256, rope_scaling=yarn)


def test_chat_session_reports_each_crossing_and_answers_the_same(yarn_dir):
    model, tok = load(yarn_dir)
    chat = ChatSession(model, tok, enable_thinking=False, temperature=0, max_tokens=12)
    results = [chat.send(text) for text in ("hello", "and again", "once more", "last")]
    assert [r.answer for r in results] == ["Hi there!"] * 4
    factors = [r.rope_factor for r in results]
    assert factors == sorted(factors) and factors[0] == 1.0 and factors[-1] == 4.0, factors
    for before, r in zip([None] + results, results):
        crossed = before is not None and r.rope_factor != before.rope_factor
        assert r.rescaled_from == (before.rope_factor if crossed else None)
        assert (r.cached_tokens == 0) == (before is None or crossed)


def test_the_cli_says_when_a_chat_outgrew_its_factor(yarn_dir):
    folder = yarn_dir
    cmd = [sys.executable, "-m", "mlx_qwen3.generate", "--model", str(folder), "--chat", "--no-think",
           "--temp", "0", "--max-tokens", "12"]
    out = subprocess.run(cmd, input="hello\nand again\nonce more\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "the conversation outgrew plain RoPE: its context was processed again with YaRN x2" in out.stderr
    assert "YaRN x2" in out.stderr and out.stdout.count("Hi there!") == 3
    bad = subprocess.run(cmd[:5] + ["--prompt", "hi", "--rope", "static"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'static' is not one of 'auto', 'config', 'plain'" in bad.stderr
    static = subprocess.run(cmd[:5] + ["--prompt", "hi", "--no-think", "--json", "--rope", "config"],
                            capture_output=True, text=True, timeout=60)
    done = json.loads(static.stdout.splitlines()[-1])
    assert static.returncode == 0 and done["rope_factor"] == 4.0 and done["rescaled_from"] is None


def test_the_server_reports_the_factor_and_a_crossing_and_takes_kv_bits_per_request(yarn_dir):
    import httpx
    from conftest import NAME, serving

    model, tok = load(yarn_dir)
    first = [{"role": "user", "content": "hello"}]
    second = first + [{"role": "assistant", "content": "Hi there!"}, {"role": "user", "content": "and again"}]
    body = dict(model=NAME, temperature=0, max_tokens=12, chat_template_kwargs={"enable_thinking": False})
    with serving(model, tok) as url:
        answers = [httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": m}, timeout=60).json()
                   for m in (first, second)]
        quantized = httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": first, "kv_bits": 8},
                               timeout=60).json()
        bad = httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": first, "kv_bits": 5}, timeout=60)
    assert [a["choices"][0]["message"]["content"] for a in answers + [quantized]] == ["Hi there!"] * 3
    assert answers[0]["usage"]["rope"] == {"factor": 1.0, "rescaled_from": None}
    assert answers[1]["usage"]["rope"] == {"factor": 2.0, "rescaled_from": 1.0}
    assert answers[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert quantized["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # a 16-bit cache never serves it
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "kv_bits"
