"""The OpenAI-compatible server, driven by the real openai client and raw HTTP, on scripted models."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import NAME

from mlx_qwen3.generate import generate


def client(url, key="none"):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == [NAME]
    assert client(server).models.retrieve(NAME).id == NAME
    missing = httpx.get(f"{server}/v1/models/other-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    health = httpx.get(f"{server}/health").json()
    assert {k: health[k] for k in ("status", "model", "waiting")} == {"status": "ok", "model": NAME, "waiting": 0}


def test_chat_completion_separates_reasoning(server):
    r = client(server).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "2+2?"}],
                                               temperature=0)
    choice = r.choices[0]
    assert choice.message.content == "The answer is 4." and choice.finish_reason == "stop"
    assert choice.message.reasoning_content == "Let me think" == choice.message.reasoning
    assert r.usage.completion_tokens == 11 and r.usage.completion_tokens_details.reasoning_tokens == 5


def test_streaming_with_usage(server):
    stream = client(server).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "2+2?"}], temperature=0, stream=True,
        stream_options={"include_usage": True})
    reasoning, content, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert (reasoning, content, finish) == ("Let me think", "The answer is 4.", "stop")
    assert usage.completion_tokens == 11 and usage.total_tokens == usage.prompt_tokens + 11


def test_enable_thinking_off_and_reasoning_accepted_on_input(server):
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning": "add"},  # either name is accepted
        {"role": "assistant", "content": "4", "reasoning_content": "add"},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
    ]
    r = client(server).chat.completions.create(model=NAME, messages=messages, temperature=0, extra_body=NO_THINK)
    assert r.choices[0].message.content == "Hi there!"
    assert getattr(r.choices[0].message, "reasoning_content", None) is None


def test_stop_and_max_tokens(server):
    c = client(server)
    r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], temperature=0,
                                  stop=[" is"])
    assert r.choices[0].message.content == "The answer" and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], temperature=0,
                                  max_completion_tokens=7)
    assert r.choices[0].message.content == "The answer" and r.choices[0].finish_reason == "length"


def test_prefix_cache_is_reused(server):
    long = "tell me " * 30
    c = client(server)
    first = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": long}], temperature=0)
    messages = [{"role": "user", "content": long}, {"role": "assistant", "content": "The answer is 4."},
                {"role": "user", "content": "and?"}]
    second = c.chat.completions.create(model=NAME, messages=messages, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 1 and second.choices[0].message.content == "The answer is 4."


def test_two_alternating_conversations_each_keep_their_prefix(answering, serve):
    with serve(*answering) as url:
        c = client(url)
        turns = {name: [{"role": "user", "content": f"{name} says: " + "tell me more " * 20}] for name in "AB"}
        first = {name: c.chat.completions.create(model=NAME, messages=m, temperature=0) for name, m in turns.items()}
        for name, messages in turns.items():  # A's second turn comes after B's first
            messages += [{"role": "assistant", "content": "The answer is 4."}, {"role": "user", "content": "and?"}]
            again = c.chat.completions.create(model=NAME, messages=messages, temperature=0)
            assert again.usage.prompt_tokens_details.cached_tokens >= first[name].usage.prompt_tokens - 1
            assert again.choices[0].message.content == "The answer is 4."


@pytest.mark.parametrize("slots, gigabytes, kept", [(4, None, 2), (1, None, 1), (4, 1e-9, 0)])
def test_prompt_cache_is_bounded_in_number_and_bytes(answering, serve, slots, gigabytes, kept):
    cache_bytes = None if gigabytes is None else int(gigabytes * 2**30)
    with serve(*answering, cache_slots=slots, cache_bytes=cache_bytes) as url:
        c = client(url)
        for text in ("first question", "second question"):
            c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": text}], temperature=0)
        health = httpx.get(f"{url}/health").json()
        assert health["cached_prompts"] == kept and (health["cached_bytes"] > 0) == (kept > 0)
        again = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "second question"}],
                                          temperature=0)
        assert (again.usage.prompt_tokens_details.cached_tokens > 0) == (kept > 0)


def test_tool_calls(tool_model, serve):
    tools = [{"type": "function", "function": {"name": "f", "description": "does f", "parameters": {"type": "object"}}}]
    with serve(*tool_model) as url:
        c = client(url)
        r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "use f"}], tools=tools,
                                      temperature=0)
        without = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "use f"}],
                                            temperature=0)
        stream = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "use f"}], tools=tools,
                                           temperature=0, stream=True)
        chunks = list(stream)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "f"
    assert json.loads(call.function.arguments) == {} and call.id.startswith("call_")
    assert r.usage.prompt_tokens > without.usage.prompt_tokens  # the tools reached the template
    streamed = [tc for ch in chunks for c in ch.choices for tc in (c.delta.tool_calls or [])]
    assert [tc.function.name for tc in streamed] == ["f"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_sixteen_concurrent_streams_each_get_their_own_answer(looping, serve):
    model, tok = looping
    expected = {n: generate(model, tok, "go", enable_thinking=False, temperature=0, max_tokens=n).answer
                for n in range(3, 19)}

    def ask(n):
        stream = client(url).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "go"}], temperature=0, max_tokens=n, stream=True,
            extra_body=NO_THINK)
        text, finish = "", None
        for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        return n, text, finish

    with serve(model, tok) as url:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(ask, expected))
    assert len(results) == 16
    for n, text, finish in results:
        assert text == expected[n] and finish == "length"


def test_a_client_that_leaves_frees_the_slot(looping, serve):
    with serve(*looping) as url:
        body = {"messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 50000, **NO_THINK}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 5:
                    break  # and hang up mid-stream
        start = time.time()
        r = client(url).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "go"}],
                                                max_tokens=4, temperature=0, extra_body=NO_THINK)
        assert r.choices[0].message.content == "a ba b" and time.time() - start < 30
        deadline = time.time() + 10
        while httpx.get(f"{url}/health").json()["waiting"] and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").json()["waiting"] == 0


def test_api_key(answering, serve):
    with serve(*answering, api_key="sekrit") as url:
        from openai import AuthenticationError

        with pytest.raises(AuthenticationError):
            client(url, "wrong").models.list()
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client(url, "sekrit").chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "x"}], temperature=0).choices[0].message.content
        assert httpx.get(f"{url}/").status_code == 200  # the page loads; it asks for the key itself


BAD = [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_body"),
    ({"messages": []}, 400, "empty_messages"),
    ({"messages": "hi"}, 422, "invalid_type"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 422, "invalid_role"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 422, "unsupported_content"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 422, "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, 422, "out_of_range"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 422, "out_of_range"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 422, "out_of_range"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, 422, "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 422, "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, 422, "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 422, "out_of_range"),
    ({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"enable_thinking": "no"}}, 422,
     "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404, "model_not_found"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, 400, "context_length_exceeded"),
    (b"{" + b'"pad": "' + b"x" * (4 * 2**20) + b'"}', 413, "body_too_large"),
]


@pytest.mark.parametrize("body,status,code", BAD, ids=[c for _, _, c in BAD])
def test_bad_requests_get_openai_errors(server, body, status, code):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Content-Type": "application/json"}, timeout=30,
                   **kwargs)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_routes_and_methods(server):
    assert httpx.get(f"{server}/v1/nothing").status_code == 404
    r = httpx.get(f"{server}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    # and the server is still fine
    assert httpx.get(f"{server}/health").status_code == 200


def test_server_cli_bad_model_is_one_line(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mlx_qwen3.server", "--model", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "does not exist" in out.stderr


def test_a_long_reply_does_not_hold_up_a_short_one(looping, serve):
    with serve(*looping) as url:
        body = {"messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 50000, **NO_THINK}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as long_reply:
            lines = long_reply.iter_lines()
            next(lines)  # the long reply is under way
            r = client(url).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "go"}],
                                                    max_tokens=3, temperature=0, extra_body=NO_THINK)
            assert r.choices[0].message.content == "a ba"
            assert httpx.get(f"{url}/health").json()["waiting"] == 1  # the long one, still going


def test_a_request_that_fails_to_start_leaves_the_worker_serving(answering, serve, monkeypatch):
    import mlx_qwen3.server as server_module

    real_run, calls = server_module.run, []

    def run_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("no memory for the cache")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(server_module, "run", run_failing_once)
    with serve(*answering) as url:
        body = {"messages": [{"role": "user", "content": "2+2?"}], "temperature": 0}
        first = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert first.status_code == 500 and "no memory for the cache" in first.json()["error"]["message"]
        second = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert second.status_code == 200 and second.json()["choices"][0]["message"]["content"] == "The answer is 4."


def test_parallel_one_queues_the_second_request(looping, serve):
    with serve(*looping, parallel=1) as url:
        body = {"messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 50000, **NO_THINK}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as long_reply:
            lines = long_reply.iter_lines()
            next(lines)  # the long reply is under way
            with ThreadPoolExecutor(1) as pool:
                short = pool.submit(client(url).chat.completions.create, model=NAME, max_tokens=3, temperature=0,
                                    messages=[{"role": "user", "content": "go"}], extra_body=NO_THINK)
                deadline = time.time() + 30
                while httpx.get(f"{url}/health").json()["waiting"] < 2 and time.time() < deadline:
                    time.sleep(0.05)
                time.sleep(0.5)
                assert not short.done()  # it waits its turn
                long_reply.close()  # the long one leaves; the short one runs
                assert short.result(timeout=60).choices[0].message.content == "a ba"
