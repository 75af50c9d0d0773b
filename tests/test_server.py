"""The OpenAI-compatible server, driven by the real openai client and raw HTTP, on scripted models."""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from conftest import NAME, wait_for_health

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


@pytest.mark.parametrize("asked", ["gpt-4o", "", None])
def test_any_model_name_is_served_and_the_answer_names_the_real_one(server, asked):
    body = {"messages": [{"role": "user", "content": "2+2?"}], "temperature": 0, "max_tokens": 3}
    if asked is not None:
        body["model"] = asked
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == NAME


def test_served_model_names_are_listed(answering, serve):
    with serve(*answering, served_names=["gpt-4o", NAME, "gpt-4o"]) as url:
        assert [m.id for m in client(url).models.list().data] == [NAME, "gpt-4o"]
        assert client(url).models.retrieve("gpt-4o").id == "gpt-4o"
        r = client(url).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}],
                                                max_tokens=2, temperature=0)
        assert r.model == NAME


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


def test_a_quiet_stream_gets_keep_alives():
    """keepalive(): a ping whenever the stream is quiet for `every` seconds, the chunks in order, and the inner
    generator closed (not left running) when the client leaves."""
    import asyncio

    from mlx_qwen3.server.app import keepalive

    closed = []

    async def slow():
        try:
            yield "a"
            await asyncio.sleep(0.35)
            yield "b"
            await asyncio.sleep(10)
            yield "never"
        finally:
            closed.append(True)

    async def run():
        got, stream = [], keepalive(slow(), "P", 0.1)
        async for chunk in stream:
            got.append(chunk)
            if chunk == "b":
                break
        await stream.aclose()  # the client left
        return got

    got = asyncio.run(run())
    assert got[0] == "a" and got[-1] == "b" and 2 <= got.count("P") <= 4 and set(got[1:-1]) == {"P"}
    assert closed == [True]


def test_clients_skip_the_keep_alives(server, monkeypatch):
    from mlx_qwen3.server import app

    monkeypatch.setattr(app, "KEEPALIVE", 0.0005)  # between every two tokens
    body = {"model": NAME, "messages": [{"role": "user", "content": "2+2?"}], "temperature": 0, "stream": True}
    raw = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).text
    assert ": keep-alive\n\n" in raw
    content = "".join(c.choices[0].delta.content or "" for c in client(server).chat.completions.create(**body)
                      if c.choices)
    assert content == "The answer is 4."


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


def test_reasoning_effort_sets_the_thinking(server):
    """OpenAI's reasoning_effort, as any client sends it: none / minimal turn the thought off; low and medium bound
    it (the request's own thinking_budget first); high leaves it free."""
    from mlx_qwen3.server.chat import Chat

    c, ask = client(server), [{"role": "user", "content": "2+2?"}]
    off = c.chat.completions.create(model=NAME, messages=ask, temperature=0, reasoning_effort="none")
    assert off.choices[0].message.content == "Hi there!" and getattr(off.choices[0].message, "reasoning_content",
                                                                     None) is None
    high = c.chat.completions.create(model=NAME, messages=ask, temperature=0, reasoning_effort="high")
    assert high.choices[0].message.reasoning_content == "Let me think"
    parse = lambda **body: Chat().parse({"messages": ask, **body}).options
    assert parse(reasoning_effort="minimal") == {"enable_thinking": False}
    assert parse(reasoning_effort="low") == {"thinking_budget": 1024}
    assert parse(reasoning_effort="medium", thinking_budget=7) == {"thinking_budget": 7}
    asked = parse(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True})  # the explicit switch wins
    assert asked["enable_thinking"] is True


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


def test_without_tools_a_call_stays_in_the_content(tool_model, serve):
    """Qwen-Agent writes the tools into the system message itself and reads the call from the content."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with serve(*tool_model) as url:
        c = client(url)
        for extra in ({}, {"tools": tools, "tool_choice": "none"}):
            r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "use f"}], temperature=0,
                                          **extra)
            message = r.choices[0].message
            assert not message.tool_calls and r.choices[0].finish_reason == "stop"
            assert message.content == '<tool_call>{"name":"f","arguments":{}}</tool_call>'
            stream = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "use f"}],
                                               temperature=0, stream=True, **extra)
            chunks = list(stream)
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == message.content
            assert not any(ch.choices[0].delta.tool_calls for ch in chunks if ch.choices)


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
    ({"messages": [{"role": "user", "content": "x"}], "model": 4}, 422, "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "extreme"}, 422, "invalid_value"),
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
    import mlx_qwen3.server.engine as server_module

    real_start, calls = server_module.Generation, []

    def start_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("no memory for the cache")
        return real_start(*args, **kwargs)

    monkeypatch.setattr(server_module, "Generation", start_failing_once)
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


# ---- issue 9: bad input and faults ----

def raw_post(url, body: bytes, headers=(), content_type="application/json"):
    """A POST whose body is sent as is (lone surrogates, NaN, 4,301-digit integers: what json.dumps will not write)."""
    from test_fuzz_server import exchange, parse, request

    port = int(url.rsplit(":", 1)[1])
    data = request(port, body=body, content_type=content_type, headers=headers)
    responses = parse(exchange(port, data, False)[0])
    return responses[0]


def chat_json(**fields) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, **fields})


def with_raw(field: str, value: str, **fields) -> bytes:
    return (chat_json(**fields)[:-1] + f', "{field}": {value}}}').encode()


def assistant_calls(calls: str) -> bytes:
    return ('{"max_tokens": 1, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", '
            f'"tool_calls": {calls}}}, {{"role": "tool", "content": "1"}}]}}').encode()


HOSTILE = [  # (body, status, code, param): each once answered 500 (or a traceback), or could have
    ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "invalid_unicode", "messages"),
    ('{"model": "\\udc00", "messages": [{"role": "user", "content": "x"}]}', 400, "invalid_unicode", "model"),
    (with_raw("stop", '["\\ud800"]'), 400, "invalid_unicode", "stop"),
    (with_raw("tools", '[{"type": "function", "function": {"name": "\\udbff"}}]'), 400, "invalid_unicode", "tools"),
    (assistant_calls('[{"function": {"name": "\\ud800", "arguments": "{}"}}]'), 400, "invalid_unicode", "messages"),
    (with_raw("chat_template_kwargs", '{"\\ud800": 1}'), 400, "invalid_unicode", "chat_template_kwargs"),
    (with_raw("user", '"\\ud800"'), 400, "invalid_unicode", "user"),  # fields we do not read, too
    (with_raw("seed", "9" * 4301), 400, "invalid_json", None),
    (with_raw("model", "[" * 1000 + "]" * 1000), 400, "invalid_json", None),
    (with_raw("chat_template_kwargs", '{"x": ' + "[" * 150 + "]" * 150 + "}"), 400, "too_deep",
     "chat_template_kwargs"),
    (with_raw("tools", '[{"type": "function", "function": {"name": "f", "parameters": ' + "[" * 200 + "]" * 200 +
              "}}]"), 400, "too_deep", "tools"),
    (assistant_calls('["x"]'), 422, "invalid_tool_call", "messages[1]"),
    (assistant_calls('[{"id": "c1", "type": "function"}]'), 422, "invalid_tool_call", "messages[1]"),
    (assistant_calls('[{"function": null}]'), 422, "invalid_tool_call", "messages[1]"),
    (assistant_calls('[{"function": {"name": "f", "arguments": 5}}]'), 422, "invalid_tool_call", "messages[1]"),
    (assistant_calls('[{"function": {"arguments": "{}"}}]'), 422, "invalid_tool_call", "messages[1]"),
    (assistant_calls('{"function": {"name": "f"}}'), 422, "invalid_type", "messages[1]"),
    *[(chat_json(chat_template_kwargs={k: "x"}), 422, "reserved_template_argument", "chat_template_kwargs")
      for k in ("messages", "add_generation_prompt", "tools", "bos_token", "eos_token", "self")],
    (chat_json(seed=-1), 422, "out_of_range", "seed"),
    (chat_json(seed=2**64), 422, "out_of_range", "seed"),
    (with_raw("repetition_penalty", "1e999"), 422, "out_of_range", "repetition_penalty"),
    (with_raw("repetition_penalty", "NaN"), 422, "out_of_range", "repetition_penalty"),
    (chat_json(repetition_penalty=100), 422, "out_of_range", "repetition_penalty"),
    (chat_json(repetition_penalty=0.001), 422, "out_of_range", "repetition_penalty"),
    (with_raw("temperature", "NaN"), 422, "out_of_range", "temperature"),
    (with_raw("top_p", "-Infinity"), 422, "out_of_range", "top_p"),
    (chat_json(stop="s" * 5000), 422, "out_of_range", "stop"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body,status,code,param", HOSTILE, ids=[f"{c}-{i}" for i, (_, _, c, _) in enumerate(HOSTILE)])
def test_hostile_request_contents_get_4xx_json_even_when_streamed(server, body, status, code, param, stream):
    if stream:  # a streamed request is checked before its 200: the same answer
        body = body if isinstance(body, bytes) else body.encode()
        body = body[:-1] + b', "stream": true}'
    got, headers, raw = raw_post(server, body if isinstance(body, bytes) else body.encode())
    error = json.loads(raw)["error"]
    assert (got, error["code"], error["param"]) == (status, code, param), error
    assert headers["content-type"] == "application/json"


def test_valid_edge_values_are_served(server):
    for fields in ({"seed": 0}, {"seed": 2**64 - 1}, {"repetition_penalty": 10}, {"repetition_penalty": 0.01},
                   {"chat_template_kwargs": {"enable_thinking": False, "custom": [1, {"a": None}]}}):
        r = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                              "max_tokens": 2, **fields}, timeout=30)
        assert r.status_code == 200, (fields, r.text)
    ok_calls = assistant_calls('[{"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]')
    assert raw_post(server, ok_calls)[0] == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_template_is_a_4xx_and_a_bug_a_logged_500(answering, serve, monkeypatch, stream):
    model, tok = answering
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "stream": stream}
    with serve(model, tok) as url:
        monkeypatch.setattr(tok, "chat_template", "{{ messages[0].content / 0 }}")  # fails on the content
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_value"), r.text
        assert "the chat template" in r.json()["error"]["message"]
        monkeypatch.undo()
        monkeypatch.setattr(type(tok), "encode", lambda self, text: [][0])  # our bug: not dressed up as a 4xx
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert (r.status_code, r.json()["error"]["code"]) == (500, "internal_error"), r.text
        monkeypatch.undo()
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 200


def test_the_gil_free_encoding_gives_what_encode_gives(answering):
    tok = answering[1]
    for text in ("Hello, world!", "<|im_start|>user\nx<|im_end|>\n<think>\n\n</think>", "  spaces\n\n\ttabs ",
                 "ünïcödé 漢字 🙂" * 50, "word " * 5000):
        assert tok.encode(text) == tok._tok.encode(text, add_special_tokens=False).ids


def test_a_non_streaming_client_that_leaves_cancels_its_generation(looping, serve):
    import socket

    with serve(*looping) as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"messages": [{"role": "user", "content": "go"}], "max_tokens": 50000, **NO_THINK}).encode()
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 30
        while httpx.get(f"{url}/health").json()["waiting"] == 0 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # well under way
        assert httpx.get(f"{url}/health").json()["waiting"] == 1
        s.close()
        left = time.time()
        while httpx.get(f"{url}/health").json()["waiting"] and time.time() - left < 5:
            time.sleep(0.01)
        assert httpx.get(f"{url}/health").json()["waiting"] == 0 and time.time() - left < 1.0  # the issue: within a second


def test_health_answers_while_big_prompts_are_tokenized(looping, serve):
    """Three prompts of 1.5 MB (a million tokens together: past the window, refused once tokenized) at once;
    /health is asked every 20 ms meanwhile. Before, it waited out every tokenization (1.8 s)."""
    size = 1_500_000
    bodies = [json.dumps({"messages": [{"role": "user", "content": (f"request {i}: " + "hello world, this is a test. "
                                                                    * (size // 29))[:size]}]}).encode()
              for i in range(3)]
    with serve(*looping) as url:
        with ThreadPoolExecutor(3) as pool:
            big = [pool.submit(httpx.post, f"{url}/v1/chat/completions", content=b, timeout=120,
                               headers={"Content-Type": "application/json"}) for b in bodies]
            times = []
            with httpx.Client() as c:
                while not all(f.done() for f in big):
                    tic = time.perf_counter()
                    assert c.get(f"{url}/health").status_code == 200
                    times.append(time.perf_counter() - tic)
                    time.sleep(0.02)
        assert [f.result().json()["error"]["code"] for f in big] == ["context_length_exceeded"] * 3
    times.sort()
    print(f"\n/health during tokenizing: {len(times)} calls, median {1000 * times[len(times) // 2]:.0f} ms, "
          f"max {1000 * times[-1]:.0f} ms")
    assert len(times) >= 20  # it did run while they were tokenized
    # the bound is 100 ms: 9 in 10 calls keep it. The slowest gets a margin, for this test shares a
    # noisy 2-core machine with the tokenizer and the suite (alone: 25-48 ms at most; once in a full run, 412
    # ms); a stall behind tokenizing, as before, took 1.8 s
    assert times[int(0.9 * len(times))] < 0.1 and times[-1] < 1.0


# ---- who may call: Host, Origin, CORS, Content-Type, the key ----

def test_host_header_must_name_this_server(server):
    port = server.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", f"LOCALHOST:{port}"):
        assert httpx.get(f"{server}/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}", f"localhost.evil:{port}"):
        for method, path in (("GET", "/health"), ("GET", "/"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, f"{server}{path}", headers={"Host": host}, json={"messages": []})
            assert (r.status_code, r.json()["error"]["code"]) == (403, "host_not_allowed"), (host, path)


def test_origin_must_be_the_servers_own_page(server):
    port = int(server.rsplit(":", 1)[1])
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    own = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Origin": f"http://127.0.0.1:{port}"})
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers
    for origin in ("http://evil.example", f"http://localhost:{port}", f"http://127.0.0.1:{port + 1}", "null",
                   f"https://127.0.0.1:{port}", "file://"):
        r = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Origin": origin})
        assert (r.status_code, r.json()["error"]["code"]) == (403, "origin_not_allowed"), origin
        assert "access-control-allow-origin" not in r.headers
    # a cross-origin text/plain POST needs no preflight in a browser: it is refused all the same
    r = httpx.post(f"{server}/v1/chat/completions", content=json.dumps(body),
                   headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert r.status_code == 403


def test_allowed_origins_get_cors_answers(answering, serve):
    site = "http://localhost:3000"
    with serve(*answering, api_key="k", allow_origins=[site]) as url:
        pre = httpx.options(f"{url}/v1/chat/completions", headers={
            "Origin": site, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == site
        assert "POST" in pre.headers["access-control-allow-methods"]
        allowed = {h.strip().lower() for h in pre.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type", "x-stainless-os"} <= allowed
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                       "max_tokens": 1}, headers={"Origin": site, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == site
        assert "origin" in r.headers["vary"].lower()
        r = httpx.post(f"{url}/v1/chat/completions", json={}, headers={"Origin": site})  # errors are readable too
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == site
        other = httpx.options(f"{url}/v1/chat/completions", headers={
            "Origin": "http://localhost:3001", "Access-Control-Request-Method": "POST"})
        assert other.status_code == 403 and "access-control-allow-origin" not in other.headers


def test_bound_to_all_interfaces_any_host_but_still_no_foreign_origin(answering, serve):
    with serve(*answering, host="0.0.0.0") as url:
        port = int(url.rsplit(":", 1)[1])
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        assert httpx.get(f"{url}/health", headers={"Host": f"my-mac.lan:{port}"}).status_code == 200
        lan = {"Host": f"192.168.1.20:{port}", "Origin": f"http://192.168.1.20:{port}"}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, headers=lan).status_code == 200
        rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}  # DNS rebinding
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=rebound)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "origin_not_allowed")


@pytest.mark.parametrize("content_type,status", [
    (None, 415), ("text/plain", 415), ("application/x-www-form-urlencoded", 415),
    ("multipart/form-data; boundary=b", 415),
    ("application/jsonp", 415), ("application/json", 200), ("application/json; charset=utf-8", 200),
    ("Application/JSON;charset=UTF-8", 200)])
def test_bodies_must_be_json(server, content_type, status):
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = httpx.post(f"{server}/v1/chat/completions", headers=headers,
                   content=json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}))
    assert r.status_code == status
    if status == 415:
        assert r.json()["error"]["code"] == "unsupported_media_type"


def test_health_without_the_key_says_only_that_it_is_up(answering, serve):
    with serve(*answering, api_key="k") as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{url}/health", headers={"Authorization": "Bearer nope"}).json() == {"status": "ok"}
        full = httpx.get(f"{url}/health", headers={"Authorization": "Bearer k"}).json()
        assert full["model"] == NAME and "waiting" in full


def test_api_key_precedence(tmp_path):
    from mlx_qwen3.errors import UserError
    from mlx_qwen3.server import api_key_from

    keyfile = tmp_path / "key"
    keyfile.write_text("  from-file  \nsecond line\n")
    env = {"MLX_QWEN3_API_KEY": "from-env"}
    assert api_key_from("given", str(keyfile), env) == "given"
    assert api_key_from(None, str(keyfile), env) == "from-file"
    assert api_key_from(None, None, env) == "from-env"
    assert api_key_from(None, None, {}) is None and api_key_from(None, None, {"MLX_QWEN3_API_KEY": " "}) is None
    (tmp_path / "empty").write_text("\n")
    for bad in (tmp_path / "missing", tmp_path / "empty", tmp_path):
        with pytest.raises(UserError):
            api_key_from(None, str(bad), env)


@pytest.mark.parametrize("args", [["--api-key-file", "/nonexistent/key"], ["--api-key-file", "EMPTY"],
                                  ["--api-key", ""], ["--allow-origin", "localhost:3000"]])
def test_server_cli_bad_key_or_origin_is_one_line(tmp_path, args):
    import subprocess
    import sys

    (tmp_path / "empty").write_text("")
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    out = subprocess.run([sys.executable, "-m", "mlx_qwen3.server", "--model", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr


def test_trailing_slashes_are_served(server):
    assert httpx.get(f"{server}/v1/models/").json()["data"][0]["id"] == NAME
    assert httpx.get(f"{server}/health/").json()["status"] == "ok"
    r = httpx.post(f"{server}/v1/chat/completions/", json={"messages": [{"role": "user", "content": "x"}],
                                                          "max_tokens": 1})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    r = httpx.get(f"{server}/v1/nothing/")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("length,status", [(b"abc", 400), (b"-1", 400), (b"+5", 400), (b"1, 2", 400),
                                           (b"9" * 5000, 400), (b"99999999999999999999", 413)])
def test_junk_content_length_gets_json(answering, length, status):
    from test_fuzz_server import exchange, live, parse, request

    with live(*answering) as port:
        (got, headers, body), = parse(exchange(port, request(port, body=chat_json(), length=length), False)[0])
        assert got == status and headers["content-type"] == "application/json", body
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_mismatched_content_length_gets_json(answering):
    from test_fuzz_server import exchange, live, parse, request

    body = chat_json()
    with live(*answering) as port:
        cut = parse(exchange(port, request(port, body=body, length=len(body) - 5), False)[0])
        assert [(s, json.loads(b)["error"]["code"]) for s, _, b in cut] == [(400, "invalid_json")]
        # more than Content-Length said: the rest is read as the next request, and refused
        more = request(port, body=body, close=False) + b"and then some\r\n\r\n"
        answers = parse(exchange(port, more, False)[0])
        assert [s for s, _, _ in answers] == [200, 400] and json.loads(answers[1][2])["error"]["code"] == "invalid_http"
        # less than it said, and then the client half-closes: it gets its answer before the close
        short = parse(exchange(port, request(port, body=body, length=len(body) + 100), True)[0])
        assert [(s, json.loads(b)["error"]["code"]) for s, _, b in short] == [(400, "invalid_http")]


# ---- stopping: SIGINT / SIGTERM with generations running ----

@contextmanager
def server_process(folder, *args):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlx_qwen3.server", "--model", str(folder), "--port", str(port),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    wait_for_health(url, lambda: proc.poll() is None, lambda: proc.stderr.read().decode(), 120)
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_answers_every_client_and_exits_0(looping_dir, signame):
    import signal

    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 100000, "temperature": 0, **NO_THINK}
    answers = {}

    def streamed():
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
            answers["stream"] = (r.status_code, [line for line in r.iter_lines() if line])

    def whole(name):
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        answers[name] = (r.status_code, r.json())

    # the server is stopped (killed, if it would not stop) before the pool waits for its clients
    with ThreadPoolExecutor(3) as pool, server_process(looping_dir, "--parallel", "2") as (proc, url):
        pool.submit(streamed)
        pool.submit(whole, "running")
        deadline = time.time() + 30
        while httpx.get(f"{url}/health").json()["waiting"] < 2 and time.time() < deadline:
            time.sleep(0.05)
        pool.submit(whole, "queued")
        while httpx.get(f"{url}/health").json()["waiting"] < 3 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        tic = time.time()
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=30)
        took = time.time() - tic
    assert proc.returncode == 0 and took < 5, (proc.returncode, took, err)
    assert b"Traceback" not in err and not err.strip(), err.decode()
    for name in ("running", "queued"):
        status, reply = answers[name]
        assert (status, reply["error"]["code"]) == (503, "server_shutting_down"), answers
    status, lines = answers["stream"]
    assert status == 200 and lines[0].startswith("data: {") and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["code"] == "server_shutting_down"


def test_a_client_stuck_mid_body_does_not_hold_up_the_stop(looping_dir):
    import signal
    import socket

    with server_process(looping_dir) as (proc, url):
        s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{")  # and the rest never comes
        time.sleep(0.3)
        tic = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and time.time() - tic < 5 and b"Traceback" not in err
        s.close()


def test_a_second_signal_stops_at_once_without_a_traceback(looping_dir):
    import signal
    import socket

    with server_process(looping_dir) as (proc, url):
        s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{")  # holds the first stop in its grace period
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        tic = time.time()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and time.time() - tic < 1, (proc.returncode, err)
        assert b"Traceback" not in err and err.decode().count("\n") == 1, err.decode()
        s.close()
