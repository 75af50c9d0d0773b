"""POST /v1/messages (Anthropic's Messages API), driven by the real anthropic client and raw HTTP, on a scripted
model that thinks and calls a tool, or, without thinking (as after the tool's result), answers."""

import json

import httpx
import pytest
from chain import build, ids_of, successors, tokenizer
from conftest import NAME, _tail

from mlx_qwen3 import load
from mlx_qwen3.server.messages import Messages

anthropic = pytest.importorskip("anthropic", reason="the anthropic client is a test extra (pip install anthropic)")

ANSWER = "It is sunny in Paris today."
THOUGHT = "The user wants the weather"
CALL = '{"name":"get_weather","arguments":{"city": "Paris"}}'  # each token of it has one successor
TOOLS = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
THINK = {"type": "enabled", "budget_tokens": 1024}
T0 = {"temperature": 0}  # the anthropic client (2.x) has no sampling arguments: sent as extra fields


@pytest.fixture(scope="module")
def weather(tmp_path_factory):
    """Thinking: thinks THOUGHT and calls get_weather; not thinking: answers ANSWER."""
    tok = tokenizer()
    think = [_tail(tok)] + ids_of(tok, ["<think>", THOUGHT, "</think>", "<tool_call>", CALL, "</tool_call>",
                                        "<|im_end|>"])
    plain = [_tail(tok, enable_thinking=False)] + ids_of(tok, [ANSWER, "<|im_end|>"])
    return load(build(tmp_path_factory.mktemp("weather"), successors(think, plain), max_position_embeddings=512))


@pytest.fixture(scope="module")
def url(weather, serve):
    with serve(*weather) as u:
        yield u


def client(url, key="none"):
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)


def test_a_message_in_anthropics_shape(url):
    r = client(url).messages.create(model="claude-on-my-laptop", max_tokens=100, messages=ASK, extra_body=T0,
                                    system="You are terse.", metadata={"user_id": "u1"})
    assert r.id.startswith("msg_") and r.type == "message" and r.role == "assistant" and r.model == NAME
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == ANSWER  # no thinking unless asked
    assert (r.stop_reason, r.stop_sequence) == ("end_turn", None)
    assert r.usage.output_tokens == len(tokenizer().encode(ANSWER))
    as_blocks = client(url).messages.create(model=NAME, max_tokens=100, messages=ASK, extra_body=T0,
                                            system=[{"type": "text", "text": "You are terse."}])
    assert as_blocks.usage.input_tokens + as_blocks.usage.cache_read_input_tokens == \
        r.usage.input_tokens + r.usage.cache_read_input_tokens  # the same prompt, however the system came
    assert as_blocks.usage.cache_read_input_tokens > 0  # the first request's prompt was cached


def test_count_tokens_counts_what_the_message_would_read(url):
    c = client(url)
    counted = c.messages.count_tokens(model=NAME, messages=ASK, system="You are terse.", tools=TOOLS)
    r = c.messages.create(model=NAME, max_tokens=5, messages=ASK, system="You are terse.", tools=TOOLS, extra_body=T0)
    assert counted.input_tokens == r.usage.input_tokens + r.usage.cache_read_input_tokens > 0
    with pytest.raises(anthropic.BadRequestError):
        c.messages.count_tokens(model=NAME, messages=[])


def test_max_tokens_is_optional_and_bounds_the_reply(url):
    r = client(url).messages.create(model=NAME, max_tokens=2, messages=ASK, extra_body=T0)
    assert (r.stop_reason, r.usage.output_tokens) == ("max_tokens", 2) and r.content[0].text == "It is"
    r = httpx.post(f"{url}/v1/messages", json={"model": NAME, "messages": ASK, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["content"][0]["text"] == ANSWER  # Anthropic requires it; we do not


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences(url, stream):
    kwargs = dict(model=NAME, max_tokens=100, messages=ASK, extra_body=T0, stop_sequences=["zzz", " sunny"])
    if stream:
        with client(url).messages.stream(**kwargs) as s:
            text = "".join(s.text_stream)
            r = s.get_final_message()
        assert text == "It is"
    else:
        r = client(url).messages.create(**kwargs)
    assert r.content[0].text == "It is" and (r.stop_reason, r.stop_sequence) == ("stop_sequence", " sunny")


def test_streaming_events_in_order(url):
    events = list(client(url).messages.create(model=NAME, max_tokens=100, messages=ASK, extra_body=T0, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["message_start", "content_block_start"] and types[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert set(types[2:-3]) == {"content_block_delta"}
    assert "".join(e.delta.text for e in events[2:-3]) == ANSWER
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens > 0
    assert events[0].message.id.startswith("msg_") and events[0].message.usage.input_tokens > 0


def test_quiet_streams_get_anthropics_ping(url, monkeypatch):
    from mlx_qwen3.server import app

    monkeypatch.setattr(app, "KEEPALIVE", 0.0005)
    body = {"model": NAME, "max_tokens": 100, "messages": ASK, "temperature": 0, "stream": True}
    raw = httpx.post(f"{url}/v1/messages", json=body, timeout=60).text
    assert 'event: ping\ndata: {"type": "ping"}' in raw
    with client(url).messages.stream(model=NAME, max_tokens=100, messages=ASK, extra_body=T0) as s:
        assert s.get_final_message().content[0].text == ANSWER


def test_text_stream_and_final_message(url):
    with client(url).messages.stream(model=NAME, max_tokens=100, messages=ASK, extra_body=T0) as s:
        assert "".join(s.text_stream) == ANSWER
        final = s.get_final_message()
    assert final.content[0].text == ANSWER and final.stop_reason == "end_turn" and final.usage.output_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_round_trip_with_thinking(url, stream):
    c, kwargs = client(url), dict(model=NAME, max_tokens=200, tools=TOOLS, extra_body=T0)
    if stream:
        with c.messages.stream(messages=ASK, thinking=THINK, **kwargs) as s:
            kinds = [e.type for e in s]
            first = s.get_final_message()
        assert {"thinking", "input_json"} <= set(kinds)  # the client's own events for our deltas
    else:
        first = c.messages.create(messages=ASK, thinking=THINK, **kwargs)
    thinking, use = first.content
    assert (thinking.type, thinking.thinking) == ("thinking", THOUGHT)
    assert (use.type, use.name, use.input) == ("tool_use", "get_weather", {"city": "Paris"})
    assert use.id.startswith("toolu_") and first.stop_reason == "tool_use"
    # the assistant's turn goes back as the client gave it, thinking block and all; the tool's result after it
    messages = ASK + [{"role": "assistant", "content": first.content},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                    "content": [{"type": "text", "text": "sunny, 24 C"}]}]}]
    final = c.messages.create(messages=messages, **kwargs)
    assert [b.type for b in final.content] == ["text"] and final.content[0].text == ANSWER
    assert final.stop_reason == "end_turn"
    without = c.messages.create(messages=messages, model=NAME, max_tokens=200, extra_body=T0)
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens > \
        without.usage.input_tokens + without.usage.cache_read_input_tokens  # the tools reached the template


def test_tool_choice_is_translated(url):
    c, kwargs = client(url), dict(model=NAME, max_tokens=200, tools=TOOLS, extra_body=T0, messages=ASK, thinking=THINK)
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}):
        r = c.messages.create(tool_choice=choice, **kwargs)
        assert r.stop_reason == "tool_use" and r.content[-1].input == {"city": "Paris"}
    r = c.messages.create(tool_choice={"type": "none"}, **kwargs)  # no tools offered: the call stays text
    assert r.stop_reason == "end_turn" and [b.type for b in r.content] == ["thinking", "text"]
    assert json.loads(r.content[1].text.split("<tool_call>")[1].split("</tool_call>")[0]) == json.loads(CALL)


def test_a_thinking_budget_ends_the_thought(url):
    r = client(url).messages.create(model=NAME, max_tokens=200, messages=ASK, extra_body=T0,
                                    thinking={"type": "enabled", "budget_tokens": 2})
    thinking, text = r.content
    assert thinking.type == "thinking" and thinking.thinking.startswith("The user") and thinking.thinking != THOUGHT
    assert text.text == ANSWER  # after the forced </think> comes the answer
    assert r.usage.output_tokens_details.thinking_tokens > 2
    off = client(url).messages.create(model=NAME, max_tokens=200, messages=ASK, extra_body=T0,
                                      thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"]


def test_the_request_in_the_generators_terms():
    call = Messages().parse({
        "model": "claude", "max_tokens": 50, "system": [{"type": "text", "text": "S1"}, {"type": "text", "text": "S2"}],
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"},
                                              {"type": "thinking", "thinking": "hm", "signature": "s"},
                                              {"type": "text", "text": "let me look"},
                                              {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "bad",
                                          "is_error": True},
                                         {"type": "text", "text": "and?", "cache_control": {"type": "ephemeral"}}]}],
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": True},
        "thinking": {"type": "enabled", "budget_tokens": 64}, "stop_sequences": ["END"], "top_k": 5,
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}, "stream": True})
    assert call.messages == [
        {"role": "system", "content": "S1\nS2"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "let me look", "reasoning_content": "hm",
         "tool_calls": [{"type": "function", "id": "toolu_1", "function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "Error: bad", "tool_call_id": "toolu_1"},
        {"role": "user", "content": "and?"}]
    assert call.options == {
        "max_tokens": 50, "top_k": 5, "stop": ["END"], "enable_thinking": True, "thinking_budget": 64,
        "tools": [{"type": "function",
                   "function": {"name": "f", "parameters": {"type": "object"}, "description": "d"}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}}, "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"},
                                                                    "strict": True}}}
    assert call.stream and call.fields == {"stop": "stop_sequences", "tool_choice": "tool_choice",
                                           "parallel_tool_calls": "tool_choice", "response_format": "output_config"}


def test_what_claude_code_sends(url):
    """As Claude Code (2.1) sends it: a system message after the user's (its list of agents and skills), a system
    prompt of blocks with cache_control, adaptive thinking with output_config.effort, a beta query; and a prompt
    past the window refused in the words Claude Code reads to compact its conversation."""
    import re

    body = {"model": "qwen3", "max_tokens": 100, "stream": False, "temperature": 0, "metadata": {"user_id": "u"},
            "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
            "messages": ASK + [{"role": "system", "content": [{"type": "text", "text": "Agents: none."}]}],
            "thinking": {"type": "disabled"}, "output_config": {"effort": "high"}, "context_management": {}}
    r = httpx.post(f"{url}/v1/messages?beta=true", json=body, headers={"anthropic-beta": "x"}, timeout=60)
    assert r.status_code == 200 and r.json()["content"][0]["text"] == ANSWER, r.text
    call = Messages().parse(body)
    assert call.messages[1:] == ASK + [{"role": "system", "content": "Agents: none."}]
    effort = lambda effort, thinking: Messages().parse({**body, "thinking": thinking,
                                                        "output_config": {"effort": effort}}).options
    assert effort("low", {"type": "adaptive"})["thinking_budget"] == 1024
    assert effort("medium", THINK)["thinking_budget"] == 1024  # budget_tokens first
    assert "thinking_budget" not in effort("max", {"type": "adaptive"})
    assert "thinking_budget" not in effort("low", {"type": "disabled"})
    too_long = httpx.post(f"{url}/v1/messages", json={**body, "messages": [
        {"role": "user", "content": "word " * 600}]}, timeout=60)
    assert too_long.status_code == 400 and too_long.json()["error"]["type"] == "invalid_request_error"
    n, m = map(int, re.search(r"prompt is too long: (\d+) tokens > (\d+)", too_long.json()["error"]["message"]).groups())
    assert n > m == 512


def test_the_api_key_as_x_api_key(weather, serve):
    with serve(*weather, api_key="sekrit") as u:
        r = client(u, "sekrit").messages.create(model=NAME, max_tokens=100, messages=ASK, extra_body=T0)
        assert r.content[0].text == ANSWER
        with pytest.raises(anthropic.AuthenticationError) as e:
            client(u, "wrong").messages.create(model=NAME, max_tokens=100, messages=ASK)
        assert e.value.status_code == 401 and e.value.body["type"] == "error"
        assert e.value.body["error"]["type"] == "authentication_error"
        bearer = httpx.post(f"{u}/v1/messages", json={"messages": ASK, "max_tokens": 2},
                            headers={"Authorization": "Bearer sekrit"}, timeout=60)
        assert bearer.status_code == 200


def user(content):
    return {"model": NAME, "max_tokens": 10, "messages": [{"role": "user", "content": content}]}


BAD = [
    (user([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]), 400, "image"),
    ({"model": NAME, "max_tokens": 10, "messages": [{"role": "tool", "content": "x"}]}, 400, "user, assistant or system"),
    ({"model": NAME, "max_tokens": 10, "messages": ASK + [{"role": "system", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]}, 400, "only text blocks"),
    ({"model": NAME, "max_tokens": 10, "messages": ASK + [{"role": "assistant", "content": "The"}]}, 400, "prefill"),
    ({"model": NAME, "max_tokens": 10, "messages": []}, 400, "empty"),
    (user([{"type": "tool_use", "id": "t", "name": "f", "input": {}}]), 400, "tool_result"),
    ({**user("x"), "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "server tool"),
    ({**user("x"), "tool_choice": {"type": "sometimes"}}, 400, "tool_choice"),
    ({**user("x"), "thinking": {"type": "enabled"}}, 400, "budget_tokens"),
    ({**user("x"), "thinking": {"type": "enabled", "budget_tokens": -1}}, 400, "budget_tokens"),
    ({**user("x"), "thinking": {"type": "enabled", "budget_tokens": True}}, 400, "budget_tokens"),
    ({**user("x"), "top_k": "many"}, 422, "top_k"),
    ({**user("x"), "max_tokens": 0}, 422, "max_tokens"),
    ({**user("x"), "stop_sequences": [3]}, 422, "stop_sequences"),
    ({**user("x"), "stream": "yes"}, 400, "stream"),
    (b"{not json", 400, "not valid JSON"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[w for _, _, w in BAD])
def test_refusals_in_anthropics_error_shape(url, body, status, words):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{url}/v1/messages", headers={"Content-Type": "application/json"}, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert r.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": error["message"]}}
    assert words in error["message"]


def test_the_client_raises_its_own_errors(url):
    with pytest.raises(anthropic.BadRequestError) as e:
        client(url).messages.create(model=NAME, max_tokens=10, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}])
    assert e.value.body["error"]["type"] == "invalid_request_error" and "text only" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.UnprocessableEntityError):  # the generator's own check of an option
        client(url).messages.create(model=NAME, max_tokens=10, messages=ASK, extra_body={"top_p": 0})
    r = httpx.post(f"{url}/v1/messages", content=b"{}", headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.APIStatusError) as e:  # the server's own limit, before the body is read
        client(url).messages.create(model=NAME, max_tokens=10, messages=[{"role": "user", "content": "x" * 2**23}])
    assert e.value.status_code == 413 and e.value.body["error"]["type"] == "request_too_large"


def test_refusals_before_the_route_are_in_anthropics_shape_too(url):
    """A wrong method, an unknown path under /v1/messages and a Host the server does not answer to: the anthropic
    client reads each as its own error; the OpenAI routes keep OpenAI's shape."""
    for method, path, host, status, kind in (
            ("GET", "/v1/messages", None, 405, "invalid_request_error"),
            ("POST", "/v1/messages/batches", None, 404, "not_found_error"),
            ("POST", "/v1/messages", "evil.example:80", 403, "permission_error")):
        headers = {"Host": host} if host else {}
        r = httpx.request(method, f"{url}{path}", json={}, headers=headers, timeout=30)
        assert r.status_code == status and r.json()["type"] == "error", (path, r.text)
        assert r.json()["error"]["type"] == kind and r.json()["error"]["message"], (path, r.text)
    openai_shaped = httpx.get(f"{url}/v1/chat/completions", timeout=30)
    assert openai_shaped.status_code == 405 and openai_shaped.json()["error"]["code"] == "method_not_allowed"
    with pytest.raises(anthropic.NotFoundError) as e:
        client(url).messages.batches.list()
    assert e.value.body["error"]["type"] == "not_found_error"


def test_a_failure_mid_stream_is_an_error_event(weather, serve, monkeypatch):
    import mlx_qwen3.server.engine as engine

    def failing(*args, **kwargs):
        raise RuntimeError("no memory for the cache")

    monkeypatch.setattr(engine, "Generation", failing)
    with serve(*weather) as u:
        with pytest.raises(anthropic.APIStatusError) as e:
            with client(u).messages.stream(model=NAME, max_tokens=10, messages=ASK) as s:
                s.get_final_message()
        assert e.value.body["error"] == {"type": "api_error", "message": "no memory for the cache"}
        r = httpx.post(f"{u}/v1/messages", json=user("x"), timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
