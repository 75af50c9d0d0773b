"""A memory plan before memory runs out: kv_bits "auto" picks the least quantization that fits, a
request that fits no setting is one line (exit 2, a 400) before any work, a model that cannot fit is
refused before its weights are read, and the server admits requests by memory."""

import importlib
import json
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import mlx.core as mx
import pytest
from conftest import serving

from mlx_qwen3 import memory
from mlx_qwen3.errors import UserError
from mlx_qwen3.generate import prepare
from mlx_qwen3.load import model_args
from mlx_qwen3.models.cache import CacheSetting, PromptCache
from mlx_qwen3.server.engine import Engine, Job

QWQ = dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=64, intermediate_size=27648,
           num_attention_heads=40, num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=152064,
           max_position_embeddings=131072)
GB = 2**30


def qwq(limit_gb: float, weights_gb: float = 18):
    """QwQ-32B's config on a Mac keeping `limit_gb` resident (no weights: kv_setting reads the figures)."""
    _, args = model_args(QWQ)
    limit = int(limit_gb * GB)
    return SimpleNamespace(args=args, resident=memory.Resident(int(weights_gb * GB), limit,
                                                                f"this Mac's {limit_gb:.1f} GB"))


def edge(model, context: int) -> dict:
    """Each setting's total bytes at `context`, by bits."""
    at = model.resident
    return {r["kv_bits"]: r["total_bytes"] for r in memory.plan(model.args, at.weights, context, at.limit)}


def test_auto_picks_the_least_quantization_that_fits():
    m = qwq(48)
    need = edge(m, 60000)
    assert need[16] > need[8] > need[4]  # at QwQ's size the KV cache, not the scores, is what grows
    for limit, bits in ((need[16], None), (need[16] - 1, 8), (need[8] - 1, 4)):
        m.resident = memory.Resident(m.resident.weights, limit, "here")
        assert memory.kv_setting(m, "auto", 0, 50000, 60000) == (bits, 0)
        assert memory.kv_setting(m, None, 0, 50000, 60000) == (bits, 0)  # None is auto
    m.resident = memory.Resident(m.resident.weights, need[4] - 1, "here")
    with pytest.raises(UserError) as e:
        memory.kv_setting(m, "auto", 0, 50000, 60000)
    assert e.value.code == "context_length_exceeded"


def test_an_explicit_setting_is_taken_when_it_fits_and_refused_with_what_would():
    m = qwq(34)
    assert memory.kv_setting(m, 16, 100, 1000, 2000) == (None, 0)  # 16-bit from the start: kv_start is moot
    assert memory.kv_setting(m, 4, 100, 1000, 2000) == (4, 100)
    rows = {r["kv_bits"]: r["longest_context"] for r in memory.plan(m.args, m.resident.weights, 1, m.resident.limit)}
    assert rows[16] < 70000 < rows[8]
    assert memory.kv_setting(m, "auto", 0, 62000, 70000) == (8, 0)
    with pytest.raises(UserError) as e:
        memory.kv_setting(m, 16, 0, 62000, 70000)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    assert str(e.value) == (
        f"this request plans 70,000 tokens (prompt 62,000 + max_tokens 8,000) with 16-bit KV; with this Mac's "
        f"34.0 GB the longest that fits is {rows[16]:,} at 16-bit, {rows[8]:,} at 8-bit, {rows[4]:,} at 4-bit KV: "
        "lower max_tokens, shorten the prompt, or set kv_bits (--kv-bits) to auto or fewer bits")


def test_a_16_bit_start_must_fit_too():
    m = qwq(34)
    rows = {r["kv_bits"]: r["longest_context"] for r in memory.plan(m.args, m.resident.weights, 1, m.resident.limit)}
    assert memory.kv_setting(m, 8, rows[16], 60000, rows[8]) == (8, rows[16])
    with pytest.raises(UserError, match=r"with 8-bit KV from token"):
        memory.kv_setting(m, 8, rows[16] + 1000, 60000, rows[8])


def test_when_nothing_fits_the_line_says_the_longest_at_each_setting():
    m = qwq(24)
    with pytest.raises(UserError) as e:
        memory.kv_setting(m, "auto", 0, 62000, 70000)
    message = str(e.value)
    assert message.startswith("this request plans 70,000 tokens (prompt 62,000 + max_tokens 8,000); with this "
                              "Mac's 24.0 GB the longest that fits is ")
    assert message.endswith("at 4-bit KV: lower max_tokens or shorten the prompt") and "\n" not in message


def test_a_request_plans_its_cache_at_its_setting_and_its_16_bit_start():
    _, args = model_args(QWQ)
    full, q8 = memory.kv_bytes_per_token(args, 16), memory.kv_bytes_per_token(args, 8)
    assert memory.planned_bytes(args, CacheSetting(), 100, 1000)[0] == 1100 * full
    assert memory.planned_bytes(args, CacheSetting(8), 100, 1000)[0] == 1100 * q8
    assert memory.planned_bytes(args, CacheSetting(8, 900), 100, 1000)[0] == 899 * full  # before its switch
    assert memory.planned_bytes(args, CacheSetting(8, 2000), 100, 1000)[0] == 1100 * full  # never switches
    assert memory.planned_bytes(args, CacheSetting(), 100, 10**6)[0] == args.context_window * full  # the window
    assert memory.kv_bytes(args, CacheSetting(8, 300), 280, 512) == 512 * full  # 16-bit yet, 512 allocated


# ---- a tiny model, with MLX_QWEN3_MEMORY_GB ----

def limit_for(model, tokens: int) -> float:
    """GB in which the 16-bit plan fits exactly `tokens` of context."""
    weights = memory.weight_bytes(model)
    return (weights + memory.kv_bytes_per_token(model.args, 16) * tokens
            + memory.working_bytes(model.args, tokens) + 1) / GB


def test_prepare_resolves_auto_and_refuses_a_plan_that_cannot_fit(looping, monkeypatch):
    model, tok = looping
    n = len(prepare(model, tok, "hi", enable_thinking=False, max_tokens=1).ids)
    monkeypatch.setenv("MLX_QWEN3_MEMORY_GB", repr(limit_for(model, n + 100)))
    assert prepare(model, tok, "hi", enable_thinking=False, max_tokens=100).setting == CacheSetting(rope_factor=1.0)
    for options in (dict(max_tokens=101), dict(max_tokens=101, kv_bits=16)):
        with pytest.raises(UserError) as e:
            prepare(model, tok, "hi", enable_thinking=False, **options)
        assert e.value.code == "context_length_exceeded"
        assert f"plans {n + 101:,} tokens (prompt {n} + max_tokens 101)" in str(e.value)
        assert f"the longest that fits is {n + 100:,} at 16-bit" in str(e.value)


def test_the_cli_says_what_would_fit_in_one_line_and_exits_2(looping_dir, looping):
    model, tok = looping
    out = subprocess.run([sys.executable, "-m", "mlx_qwen3.generate", "--model", str(looping_dir), "--prompt", "hi",
                          "--no-think", "--max-tokens", "5000"], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "MLX_QWEN3_MEMORY_GB": repr(limit_for(model, 1000))})
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert out.stderr.startswith("error: this request plans ") and out.stderr.count("\n") == 1, out.stderr
    assert "the longest that fits is 1,000 at 16-bit" in out.stderr


def test_a_model_that_cannot_fit_is_refused_before_its_weights_are_read(looping_dir, monkeypatch):
    from mlx_qwen3 import load

    loader = importlib.import_module("mlx_qwen3.load")
    monkeypatch.setattr(loader, "read_weights", lambda folder: pytest.fail("read the weights"))
    monkeypatch.setenv("MLX_QWEN3_MEMORY_GB", "0.001")
    with pytest.raises(UserError, match=r"^the weights and a prompt's working memory take [\d.]+ GB, more than the "
                                        r"0\.0 GB this Mac keeps resident: use a smaller or more quantized model$"):
        load(looping_dir)


@pytest.mark.parametrize("command", ["mlx_qwen3.generate", "mlx_qwen3.server"])
def test_the_cli_refuses_such_a_model_in_one_line(looping_dir, command):
    extra = ["--prompt", "hi"] if command.endswith("generate") else ["--port", "1"]
    out = subprocess.run([sys.executable, "-m", command, "--model", str(looping_dir), *extra], capture_output=True,
                         text=True, timeout=120, env={**__import__("os").environ, "MLX_QWEN3_MEMORY_GB": "0.001"})
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: the weights and a prompt's working memory take "), out.stderr


# ---- the server ----

def ask(url, content: str, **body):
    return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": content}], "chat_template_kwargs": {"enable_thinking": False},
        **body})


def test_the_server_answers_400_before_any_work(looping, monkeypatch):
    model, tok = looping
    monkeypatch.setenv("MLX_QWEN3_MEMORY_GB", repr(limit_for(model, 1000)))
    with serving(model, tok) as url:
        for body in (dict(max_tokens=5000), dict(max_tokens=5000, kv_bits=8), dict(max_tokens=5000, kv_bits="auto")):
            r = ask(url, "hi", **body)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
            assert error["message"].startswith("this request plans ") and "the longest that fits is" in error["message"]
        health = httpx.get(f"{url}/health").json()
        assert health["requests"] == [] and health["cached_prompts"] == 0 and health["waiting"] == 0
        r = ask(url, "hi", max_tokens=4, kv_bits=16)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text


def content(line: str) -> str:
    """A streamed chunk's answer text ("" for other lines)."""
    if not line.startswith("data: {"):
        return ""
    return json.loads(line[6:])["choices"][0]["delta"].get("content") or ""


def test_a_request_waits_until_the_memory_the_first_holds_is_free(looping, monkeypatch):
    """One request's plan fits, two do not: the second starts only once the first has ended (here, when
    its client leaves), and both answers are right."""
    model, tok = looping
    first, second = "go " * 40, "hi"
    long = prepare(model, tok, first, enable_thinking=False, max_tokens=50000)
    short = prepare(model, tok, second, enable_thinking=False, max_tokens=20)
    kv_long, work = memory.planned_bytes(model.args, long.setting, len(long.ids), 50000)
    kv_short, _ = memory.planned_bytes(model.args, short.setting, len(short.ids), 20)
    alone = memory.weight_bytes(model) + kv_long + work
    monkeypatch.setenv("MLX_QWEN3_MEMORY_GB", repr((alone + kv_short // 2) / GB))
    with serving(model, tok) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": first}], "max_tokens": 50000, "stream": True,
                "chat_template_kwargs": {"enable_thinking": False}}) as stream:
            lines = stream.iter_lines()
            while not content(next(lines)):  # the first is generating
                pass
            answer = {}
            waiter = threading.Thread(target=lambda: answer.update(r=ask(url, second, max_tokens=20)))
            waiter.start()
            for _ in range(500):
                health = httpx.get(f"{url}/health").json()
                if health["waiting"] == 2:
                    break
                time.sleep(0.02)
            assert health["waiting"] == 2 and [r["prompt_tokens"] for r in health["requests"]] == [len(long.ids)]
            for _ in range(20):  # and it stays so while the first runs
                health = httpx.get(f"{url}/health").json()
                assert [r["prompt_tokens"] for r in health["requests"]] == [len(long.ids)] and waiter.is_alive()
            got = ""
            for line in lines:  # some more of the first's answer
                got += content(line)
                if len(got) > 40:
                    break
        waiter.join(timeout=120)
    assert "ba b" in got and set(got) <= set("ab "), got
    reply = answer["r"].json()["choices"][0]
    assert reply["finish_reason"] == "length" and reply["message"]["content"].startswith("a b"), reply


def stopped(engine: Engine) -> Engine:
    """An engine whose worker has ended: its decisions are called here, one at a time."""
    engine.close()
    assert engine.stop(timeout=10)
    engine.closing = False
    return engine


def test_cached_prompts_are_dropped_oldest_first_before_a_request_waits(looping):
    model, tok = looping
    engine = stopped(Engine(model, tok))
    for n in (300, 10):
        cache = PromptCache.new(model)
        cache.ids = list(range(n))
        model(mx.array([cache.ids]), cache=cache.layers)
        engine.pool.put(cache)
    old, new = engine.pool.sizes()
    assert old > new > 0
    job = SimpleNamespace(prompt=prepare(model, tok, "hi", enable_thinking=False, max_tokens=50))
    kv, work = memory.planned_bytes(model.args, job.prompt.setting, len(job.prompt.ids), 50)
    base = memory.weight_bytes(model) + 2 * kv + work  # two such jobs
    for limit, drop in ((base + old + new, 0), (base + new, 1), (base, 2), (base - 1, None)):
        engine.resident = memory.Resident(memory.weight_bytes(model), limit, "here")
        assert engine._room([job, job], 0) == drop, limit
    assert engine._room([job], 0) == 2  # alone, it starts however little is left
    assert len(engine.pool) == 2  # deciding drops nothing; the round does
    engine.rounds.drop(1)
    assert engine.pool.sizes() == [new]


def test_a_job_that_waits_is_not_overtaken(looping):
    """FIFO: behind a job waiting for memory, a smaller one that would fit waits too."""
    model, tok = looping
    engine = stopped(Engine(model, tok))
    running = SimpleNamespace(prompt=prepare(model, tok, "go " * 40, enable_thinking=False, max_tokens=5000))
    big = Job(prepare(model, tok, "go " * 40, enable_thinking=False, max_tokens=5000), loop=None)
    small = Job(prepare(model, tok, "hi", enable_thinking=False, max_tokens=5), loop=None)
    kv, work = memory.planned_bytes(model.args, running.prompt.setting, len(running.prompt.ids), 5000)
    weights = memory.weight_bytes(model)
    engine.resident = memory.Resident(weights, int(weights + 1.5 * kv + work), "here")
    engine.rounds.active.append((running, None, None, None))  # as if it ran
    engine.jobs.put(big)
    engine.jobs.put(small)
    assert engine._admit() == ([], 0) and engine.held is big and engine.waiting == 3
    assert engine._admit() == ([], 0) and engine.held is big  # small would fit, but waits its turn
    engine.rounds.active.clear()
    assert engine._admit() == ([big, small], 0) and engine.held is None


# ---- several ranks: one plan ----

AGREE = """
import json, os, sys
from mlx_qwen3 import distributed, load, memory
from mlx_qwen3.errors import UserError
from mlx_qwen3.generate import generate, prepare

model, tok = load(sys.argv[1])
rank, args = distributed.rank(), model.args
# rank 1 keeps room for 100 tokens of 16-bit KV beside its weights, rank 0 for 200
tokens = 200 if rank == 0 else 100
room = memory.weight_bytes(model) + memory.working_bytes(args, 0) + memory.kv_bytes_per_token(args, 16) * tokens
os.environ["MLX_QWEN3_MEMORY_GB"] = repr(room / 2**30)
model.resident = memory.agree_resident(model, distributed.group())
out = {"resident": [model.resident.weights, model.resident.limit],
       "own": [memory.weight_bytes(model), memory.usable_memory(), memory.kv_share(model)]}
for max_tokens in (50, 150):
    try:
        out[max_tokens] = list(prepare(model, tok, "hi", enable_thinking=False, max_tokens=max_tokens).setting)
    except UserError as e:
        out[max_tokens] = str(e)
out["answer"] = generate(model, tok, "hi", enable_thinking=False, max_tokens=5, temperature=0).answer
with open(f"agree{rank}.json", "w") as f:
    json.dump(out, f)
"""


def test_ranks_with_other_memory_plan_a_prompt_alike(looping_dir, tmp_path):
    """Each rank's own figures would choose otherwise (rank 0 fits 150 new tokens, rank 1 does not): the
    ranks agree at load on the least headroom, and every rank takes the same setting, or refuses alike."""
    from test_distributed import launch

    launch(2, "-c", AGREE.replace('f"agree{rank}.json"', f'"{tmp_path}/agree" + str(rank) + ".json"'),
           str(looping_dir))
    ranks = [json.loads((tmp_path / f"agree{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == {**ranks[1], "own": ranks[0]["own"]}
    (w0, limit0, share0), (w1, limit1, share1) = ranks[0]["own"], ranks[1]["own"]
    weights, limit = ranks[0]["resident"]
    assert weights == w0 + w1 and limit == weights + int(min((limit0 - w0) / share0, (limit1 - w1) / share1))
    assert limit1 - w1 < limit0 - w0 and share0 == share1 == 1.0  # one key/value head: each rank holds it
    assert ranks[0]["50"] == [None, 0, 1.0]
    assert ranks[0]["150"].startswith("this request plans ") and "ranks' memory" in ranks[0]["150"]
    assert set(ranks[0]["answer"]) <= set("ab ") and ranks[0]["answer"]
