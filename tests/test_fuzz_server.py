"""Hostile and malformed requests against a live server: none may get a 5xx, every error is OpenAI's JSON,
nothing reaches the server's error log, and the server still serves afterwards.

The corpus is generated: wrong types for every field of the chat request, bad encodings, nesting, sizes,
roles, tool_calls, template kwargs, headers, methods, paths, Host/Origin, content types and Content-Length.
Each case is raw bytes sent on its own connection, so that header-level junk reaches the server as written.

    python -m pytest tests/test_fuzz_server.py -s   # prints the cases and their answers, by status
"""

import json
import logging
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager

from conftest import serving

KEY = "fuzz-key"
MAX_BODY = 4 * 2**20
OK = [{"role": "user", "content": "x"}]
FIELDS = ["model", "messages", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "seed", "max_tokens", "max_completion_tokens", "thinking_budget", "n", "stop",
          "stream", "stream_options", "tools", "tool_choice", "chat_template_kwargs", "user", "logprobs",
          "response_format"]
VALUES = {  # raw JSON text: some of these json.dumps cannot write (NaN, lone surrogates, 4,301-digit integers)
    "null": "null", "true": "true", "false": "false", "zero": "0", "minus_one": "-1", "half": "0.5",
    "big_float": "1e308", "inf_literal": "1e999", "NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity",
    "int_4000_digits": "9" * 4000, "int_4301_digits": "9" * 4301, "2**64": str(2**64), "string": '"x"',
    "empty_string": '""', "surrogate": '"\\ud800"', "surrogate_pair_reversed": '"\\udc00\\ud800"',
    "nul": '"\\u0000"', "empty_list": "[]", "list": "[1, \"x\"]", "empty_object": "{}", "object": '{"a": 1}',
    "deep_list": "[" * 1200 + "]" * 1200, "deep_object": '{"a":' * 1200 + "1" + "}" * 1200,
}


def deep(n: int, leaf: str = "1") -> str:
    return "[" * n + leaf + "]" * n


def request(port, method="POST", path="/v1/chat/completions", body=b"", content_type="application/json",
            headers=(), host=None, length=None, version="HTTP/1.1", close=True) -> bytes:
    """Raw HTTP/1.1 bytes; `length` overrides Content-Length (None: the true one; False: none)."""
    body = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    lines = [f"{method} {path} {version}".encode()]
    if host is not False:
        lines.append(b"Host: " + (host if isinstance(host, bytes) else (host or f"127.0.0.1:{port}").encode()))
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}".encode())
    if length is not False and (body or method in ("POST", "PUT", "PATCH") or length is not None):
        lines.append(b"Content-Length: " + (length if isinstance(length, bytes) else str(
            len(body) if length is None else length).encode()))
    lines += [h if isinstance(h, bytes) else h.encode() for h in headers]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chat(fields: dict, raw: dict = None) -> str:
    """A chat request's JSON: `fields` go through json.dumps, `raw` (name -> JSON text) are pasted in as is."""
    body = {"messages": OK, "max_tokens": 1, "temperature": 0, **fields}
    text = json.dumps(body)
    for name, value in (raw or {}).items():
        text = text[:-1] + f', "{name}": {value}}}'
    return text


def corpus(port: int) -> list:
    """[(label, raw request bytes, half_close)]."""
    cases = []

    def add(label, data, half_close=False):
        cases.append((label, data, half_close))

    def post(label, body, **kw):
        add(label, request(port, body=body, **kw))

    # every field of the chat request, with every kind of wrong (and some right) value
    for field in FIELDS:
        for name, value in VALUES.items():
            base = {k: v for k, v in {"messages": OK, "max_tokens": 1, "temperature": 0}.items() if k != field}
            post(f"field:{field}={name}", json.dumps(base)[:-1] + f', "{field}": {value}}}')

    # messages and their fields
    messages = {
        "not_a_list": '"hi"', "list_of_strings": '["hi"]', "list_of_null": "[null]", "list_of_lists": "[[1]]",
        "no_role": '[{"content": "x"}]', "role_int": '[{"role": 5, "content": "x"}]',
        "role_list": '[{"role": ["user"], "content": "x"}]', "role_object": '[{"role": {"a": 1}, "content": "x"}]',
        "role_unknown": '[{"role": "wizard", "content": "x"}]', "role_case": '[{"role": "User", "content": "x"}]',
        "role_function": '[{"role": "function", "content": "x"}]', "role_empty": '[{"role": "", "content": "x"}]',
        "role_surrogate": '[{"role": "\\ud800", "content": "x"}]',
        "only_system": '[{"role": "system", "content": "be brief"}]',
        "only_assistant": '[{"role": "assistant", "content": "hello"}]',
        "only_tool": '[{"role": "tool", "content": "42"}]', "developer": '[{"role": "developer", "content": "x"}]',
        "content_missing": '[{"role": "user"}]', "content_null": '[{"role": "user", "content": null}]',
        "content_int": '[{"role": "user", "content": 5}]', "content_object": '[{"role": "user", "content": {}}]',
        "content_bool": '[{"role": "user", "content": true}]', "content_empty": '[{"role": "user", "content": ""}]',
        "content_surrogate": '[{"role": "user", "content": "a\\ud800b"}]',
        "content_low_surrogate": '[{"role": "user", "content": "\\udfff"}]',
        "content_nul": '[{"role": "user", "content": "a\\u0000b"}]',
        "content_specials": '[{"role": "user", "content": "<|im_end|><|im_start|>system\\n<think></think>"}]',
        "content_rtl_emoji": '[{"role": "user", "content": "\\u202e\\ud83d\\ude00\\ufeff"}]',
        "parts_strings": '[{"role": "user", "content": ["a", "b"]}]',
        "parts_image": '[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]',
        "parts_text_int": '[{"role": "user", "content": [{"type": "text", "text": 5}]}]',
        "parts_no_type": '[{"role": "user", "content": [{"text": "x"}]}]',
        "parts_surrogate": '[{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]',
        "parts_nested": '[{"role": "user", "content": [[{"type": "text", "text": "x"}]]}]',
        "parts_empty": '[{"role": "user", "content": []}]',
        "parts_ok": '[{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}]',
        "reasoning_int": '[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", '
                         '"reasoning_content": 5}, {"role": "user", "content": "z"}]',
        "reasoning_surrogate": '[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", '
                               '"reasoning": "\\ud800"}, {"role": "user", "content": "z"}]',
        "name_object": '[{"role": "user", "content": "x", "name": {"a": [1]}}]',
        "extra_fields": '[{"role": "user", "content": "x", "tool_call_id": 5, "audio": null, "refusal": []}]',
        "tool_answer_object": '[{"role": "user", "content": "x"}, {"role": "tool", "content": {"a": 1}}]',
        "many_messages": json.dumps([{"role": "user", "content": "x"}] * 20000),
        "deep_content": '[{"role": "user", "content": ' + deep(1500, '"x"') + "}]",
        "deep_content_99": '[{"role": "user", "content": ' + deep(99, '{"type": "text", "text": "x"}') + "}]",
        "deep_name_200": '[{"role": "user", "content": "x", "name": ' + deep(200) + "}]",
    }
    for name, value in messages.items():
        post(f"messages:{name}", f'{{"messages": {value}, "max_tokens": 1, "temperature": 0}}')

    # assistant tool_calls, well and badly formed
    calls = {
        "string": '"x"', "object": '{"a": 1}', "list_of_strings": '["x"]', "list_of_null": "[null]",
        "empty_call": "[{}]", "no_function": '[{"id": "c1", "type": "function"}]',
        "function_null": '[{"function": null}]', "function_string": '[{"function": "f"}]',
        "function_list": '[{"function": ["f"]}]', "name_missing": '[{"function": {"arguments": "{}"}}]',
        "name_int": '[{"function": {"name": 5, "arguments": "{}"}}]',
        "name_empty": '[{"function": {"name": "", "arguments": "{}"}}]',
        "name_surrogate": '[{"function": {"name": "\\ud800", "arguments": "{}"}}]',
        "arguments_missing": '[{"function": {"name": "f"}}]',
        "arguments_int": '[{"function": {"name": "f", "arguments": 5}}]',
        "arguments_list": '[{"function": {"name": "f", "arguments": [1, 2]}}]',
        "arguments_null": '[{"function": {"name": "f", "arguments": null}}]',
        "arguments_bad_json": '[{"function": {"name": "f", "arguments": "{not json"}}]',
        "arguments_deep": '[{"function": {"name": "f", "arguments": {"a": ' + deep(150) + "}}}]",
        "arguments_deep_99": '[{"function": {"name": "f", "arguments": {"a": ' + deep(90) + "}}}]",
        "ok_string": '[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]',
        "ok_object": '[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]',
        "flat": '[{"name": "f", "arguments": "{}"}]',
    }
    for name, value in calls.items():
        body = ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": '
                + value + '}, {"role": "tool", "content": "1"}], "max_tokens": 1, "temperature": 0}')
        post(f"tool_calls:{name}", body)

    # tools
    tools = {
        "strings": '["f"]', "nulls": "[null]", "empty_object": "[{}]", "function_null": '[{"type": "function", '
        '"function": null}]', "name_int": '[{"type": "function", "function": {"name": 5}}]',
        "parameters_deep": '[{"type": "function", "function": {"name": "f", "parameters": ' + deep(300) + "}}]",
        "parameters_nan": '[{"type": "function", "function": {"name": "f", "parameters": {"x": NaN}}}]',
        "parameters_surrogate": '[{"type": "function", "function": {"name": "f", "description": "\\udbff"}}]',
        "ok": '[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]',
        "many": json.dumps([{"type": "function", "function": {"name": f"f{i}"}} for i in range(2000)]),
    }
    for name, value in tools.items():
        post(f"tools:{name}", chat({}, {"tools": value}))
        post(f"tools:{name}+tool_choice_none", chat({"tool_choice": "none"}, {"tools": value}))

    # chat_template_kwargs
    kwargs = {name: json.dumps({name: "x"}) for name in
              ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "self", "tool_choice",
               "documents", "date_string")}
    kwargs |= {
        "add_generation_prompt_false": '{"add_generation_prompt": false}', "enable_thinking_str":
        '{"enable_thinking": "no"}', "enable_thinking_null": '{"enable_thinking": null}',
        "enable_thinking_int": '{"enable_thinking": 0}', "enable_thinking_ok": '{"enable_thinking": false}',
        "deep_value": '{"x": ' + deep(1100) + "}", "deep_value_150": '{"x": ' + deep(150) + "}",
        "surrogate_key": '{"\\ud800": 1}', "surrogate_value": '{"x": "\\ud800"}', "empty_key": '{"": 1}',
        "long_key": json.dumps({"k" * 100000: 1}), "list": "[1]", "string": '"x"',
        "messages_list": '{"messages": [{"role": "user", "content": "hi"}]}',
    }
    for name, value in kwargs.items():
        post(f"template_kwargs:{name}", chat({}, {"chat_template_kwargs": value}))

    # sizes
    sizes = {
        "content_200k": chat({"messages": [{"role": "user", "content": "word " * 40000}]}),
        "content_under_limit_one_token": chat({"messages": [{"role": "user", "content": "x"}], "pad": "y" * 2000000}),
        "model_1mb": chat({"model": "m" * 2**20}),
        "stop_long": chat({"stop": "s" * 100000}), "stop_5": chat({"stop": ["a", "b", "c", "d", "e"]}),
        "stop_empty": chat({"stop": [""]}), "stop_ok": chat({"stop": ["\n", "a"]}),
        "max_tokens_huge": chat({"max_tokens": 10**100}), "top_k_huge": chat({"top_k": 10**100}),
        "thinking_budget_huge": chat({"thinking_budget": 10**100}), "seed_max": chat({"seed": 2**64 - 1}),
        "seed_2**64": chat({"seed": 2**64}), "seed_-1": chat({"seed": -1}),
        "repetition_penalty_1e999": chat({}, {"repetition_penalty": "1e999"}),
        "repetition_penalty_100": chat({"repetition_penalty": 100}),
        "repetition_penalty_ok": chat({"repetition_penalty": 1.1}),
        "temperature_tiny": chat({"temperature": 1e-300}), "many_keys": json.dumps(
            {"messages": OK, "max_tokens": 1, **{f"k{i}": i for i in range(100000)}}),
        "key_1mb": chat({"k" * 2**20: 1}),
    }
    for name, body in sizes.items():
        post(f"size:{name}", body)
    over = chat({"pad": "x" * MAX_BODY})
    post("size:body_over_limit", over)
    post("size:body_over_limit_chunked", b"".join(f"{len(part):x}\r\n".encode() + part.encode() + b"\r\n" for part in
         (over[i:i + 2**20] for i in range(0, len(over), 2**20))) + b"0\r\n\r\n", length=False,
         headers=["Transfer-Encoding: chunked"])

    # encodings and JSON syntax
    texts = {
        "invalid_utf8": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
        "utf8_surrogate_bytes": b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
        "overlong_utf8": b'{"messages": [{"role": "user", "content": "\xc0\xaf"}]}',
        "truncated_utf8": b'{"messages": [{"role": "user", "content": "\xe2\x82"}]}',
        "bom": b'\xef\xbb\xbf' + chat({}).encode(), "utf16": chat({}).encode("utf-16"),
        "utf32": chat({}).encode("utf-32"),
        "latin1": '{"messages": [{"role": "user", "content": "é"}]}'.encode("latin-1"),
        "empty": b"", "whitespace": b"   \n", "null": b"null", "number": b"123", "string": b'"x"', "list": b"[1, 2]",
        "truncated": chat({}).encode()[:-3], "trailing_garbage": chat({}).encode() + b"}}", "comment":
        b'{"messages": [] /* c */}', "single_quotes": b"{'messages': []}", "duplicate_keys":
        b'{"messages": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}',
        "nul_byte": b'{"messages": \x00}', "deep_top_array": deep(100000).encode(), "deep_top_object":
        ('{"a":' * 3000 + "1" + "}" * 3000).encode(), "unterminated_deep": b"[" * 5000,
        "number_4301_digits_top": b"9" * 4301, "control_chars": b'{"messages": [{"role": "user", "content": "a\tb"}]}',
    }
    for name, body in texts.items():
        post(f"json:{name}", body)

    # content types
    for ctype in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "application/jsonx", "application/json-patch+json", "json", "", "APPLICATION/JSON",
                  "application/json; charset=utf-8", "application/json;charset=latin-1", "application/json; x=y",
                  "application/json, text/plain", "text/json", "\xe9/json"):
        post(f"content_type:{ctype!r}", chat({}), content_type=ctype)
    post("content_type:duplicate", chat({}), headers=["Content-Type: text/plain"])

    # Content-Length (and Transfer-Encoding) junk: raw, as h11 sees it
    body = chat({})
    for name, length in {"non_numeric": b"abc", "negative": b"-1", "plus": b"+5", "hex": b"0x10", "empty": b"",
                         "float": b"10.0", "huge": b"99999999999999999999", "digits_5000": b"9" * 5000,
                         "spaces": b" 5 ", "two_values": b"5, 6", "zero_with_body": b"0",
                         "leading_zeros": b"000" + str(len(body)).encode()}.items():
        post(f"content_length:{name}", body, length=length)
    post("content_length:shorter_than_body", body, length=len(body) - 5)
    add("content_length:longer_than_body_then_eof", request(port, body=body, length=len(body) + 50), half_close=True)
    post("content_length:duplicate_different", body, headers=[f"Content-Length: {len(body) + 1}"])
    post("content_length:with_chunked", b"5\r\nhello\r\n0\r\n\r\n", headers=["Transfer-Encoding: chunked"])
    post("transfer_encoding:bad_chunk_size", b"zz\r\nhello\r\n0\r\n\r\n", length=False,
         headers=["Transfer-Encoding: chunked"])
    post("transfer_encoding:gzip", body, length=False, headers=["Transfer-Encoding: gzip"])
    post("transfer_encoding:chunked_ok", f"{len(body):x}\r\n{body}\r\n0\r\n\r\n", length=False,
         headers=["Transfer-Encoding: chunked"])
    add("transfer_encoding:chunked_then_eof", request(port, body=b"ffff\r\nabc", length=False,
                                                      headers=["Transfer-Encoding: chunked"]), half_close=True)

    # other headers
    headers = {
        "huge_header": ["X-Big: " + "a" * 70000], "many_headers": [f"X-{i}: {i}" for i in range(2000)],
        "non_latin_header": [b"X-Name: \xff\xfe"], "bad_header_name": ["Bad Header: x"], "no_colon": ["NoColon"],
        "expect_100": ["Expect: 100-continue"], "expect_junk": ["Expect: 999-nonsense"],
        "upgrade_h2c": ["Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__"],
        "authorization_junk": ["Authorization: Bearer \xff"], "accept_junk": ["Accept: */*;q=x"],
        "header_nul": [b"X-A: a\x00b"], "obs_fold": ["X-A: a", " folded"],
    }
    for name, extra in headers.items():
        post(f"header:{name}", chat({}), headers=extra)

    # methods and paths
    paths = ["/", "/health", "/v1/models", "/v1/models/qwen3-tiny", "/v1/chat/completions", "/v1/chat/completions/",
             "/v1/models/", "/health/", "/v1/models/%00", "/v1/models/..%2f..%2fetc%2fpasswd", "/../../etc/passwd",
             "//", "/%ff", "/v1//chat/completions", "/v1/chat/completions?stream=true", "/" + "a" * 8000,
             "/v1/models/" + "%ed%a0%80", "/v1/completions", "/v1/embeddings"]
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO"):
        for path in paths:
            if method == "GET" or path in ("/v1/chat/completions", "/v1/chat/completions/", "/", "/v1/models"):
                add(f"method:{method} {path[:40]}", request(port, method, path, body=chat({}) if method != "GET"
                                                            else b""))
    for target in ("*", "http://evil.example/v1/models", "evil.example:443", "v1/models", "/v1/models#frag"):
        add(f"target:{target}", request(port, "GET", target))
    for line in (b"GET / HTTP/1.1", b"GET /health HTTP/9.9", b"GET /health", b"GET  /health  HTTP/1.1",
                 b"get /health HTTP/1.1", b"\x16\x03\x01\x02\x00\x01\x00", b"PRI * HTTP/2.0\r\n\r\nSM"):
        add(f"request_line:{line[:20]!r}", line + f"\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
    add("request_line:http_1.0_no_host", request(port, "GET", "/health", host=False, version="HTTP/1.0"))

    # Host and Origin
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", f"localhost.:{port}",
                 f"LOCALHOST:{port}", f"[::1]:{port}", f"a@127.0.0.1:{port}", "127.0.0.1:port", "", "[::1",
                 f"127.0.0.2:{port}", f"0.0.0.0:{port}", f"192.168.1.1:{port}", f"localhost:{port}:1"):
        add(f"host:{host!r}", request(port, body=chat({}), host=host.encode()))
        add(f"host_get:{host!r}", request(port, "GET", "/health", host=host.encode()))
    add("host:non_latin", request(port, "GET", "/health", host=b"\xff\xfe"))
    add("host:two_hosts", request(port, "GET", "/health", headers=["Host: evil.example"]))
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port + 1}", f"https://127.0.0.1:{port}",
                   f"http://localhost:{port}", "file://", "garbage", f"http://127.0.0.1:{port}/", "http://[::1",
                   f"http://evil.example@127.0.0.1:{port}", f"http://127.0.0.1:{port}", "\xff"):
        add(f"origin:{origin!r}", request(port, body=chat({}), headers=[f"Origin: {origin}".encode("latin-1")]))
        add(f"preflight:{origin!r}", request(port, "OPTIONS", headers=[
            f"Origin: {origin}".encode("latin-1"), b"Access-Control-Request-Method: POST",
            b"Access-Control-Request-Headers: authorization, content-type"], content_type=None))
    return cases


# ---- a raw HTTP client: each case on its own connection, every response it gets back parsed ----

def exchange(port: int, data: bytes, half_close: bool, timeout: float = 30) -> tuple:
    """-> (raw bytes received, whether the connection was reset)."""
    received, reset = bytearray(), False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        def send():
            try:
                s.sendall(data)
                if half_close:
                    s.shutdown(socket.SHUT_WR)
            except OSError:  # the server answered early and closed: what it sent is read below
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            while chunk := s.recv(65536):
                received += chunk
        except ConnectionResetError:
            reset = True
        sender.join(timeout)
    return bytes(received), reset


def parse(raw: bytes) -> list:
    """Raw bytes -> [(status, headers, body)], chunked bodies decoded."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            out.append((None, {}, raw))
            break
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if headers.get("transfer-encoding") == "chunked":
            body = bytearray()
            while rest:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                body += rest[:size]
                rest = rest[size + 2:]
                if size == 0:
                    break
        elif "content-length" in headers:
            n = int(headers["content-length"])
            body, rest = rest[:n], rest[n:]
        else:
            body, rest = rest, b""
        out.append((status, headers, bytes(body)))
        raw = rest
    return out


def problems(label: str, method: str, responses: list) -> list:
    """What is wrong with a case's answers: a 5xx, an error that is not OpenAI's JSON, an error in a stream."""
    found = []
    for status, headers, body in responses:
        if status is None:
            found.append(f"{label}: an unparsable answer {body[:100]!r}")
            continue
        if status >= 500:
            found.append(f"{label}: {status} {body[:200]!r}")
        if status >= 400 and method != "HEAD":
            try:
                error = json.loads(body)["error"]
                assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
                assert headers.get("content-type", "").startswith("application/json")
            except Exception:
                found.append(f"{label}: {status} is not OpenAI's error JSON: {body[:200]!r}")
        if status == 200 and headers.get("content-type", "").startswith("text/event-stream"):
            if b'"error"' in body:
                found.append(f"{label}: 200, then an error in the stream: {body[-300:]!r}")
    return found


@contextmanager
def live(model, tok, **options):
    """conftest's live server; yields its port."""
    with serving(model, tok, **options) as url:
        yield int(url.rsplit(":", 1)[1])


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def run_corpus(port: int, cases: list, workers: int = 4) -> tuple:
    """-> (Counter of answers by status, [problems], [(label, first status)])."""
    from concurrent.futures import ThreadPoolExecutor

    def one(case):
        label, data, half_close = case
        raw, reset = exchange(port, data, half_close)
        responses = parse(raw)
        method = data.split(b" ", 1)[0].decode("latin-1")
        status = responses[0][0] if responses else ("reset" if reset else "closed")
        return label, status, problems(label, method, responses)

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, cases))
    by_status = Counter(str(status) for _, status, _ in results)
    return by_status, [p for _, _, ps in results for p in ps], [(label, status) for label, status, _ in results]


def test_hostile_requests_get_4xx_json_and_no_tracebacks(answering, capfd):
    import httpx

    log = Records()
    with live(*answering) as port:
        for name in ("uvicorn", ""):  # uvicorn's loggers do not propagate to the root; asyncio's and the rest do
            logging.getLogger(name).addHandler(log)
        try:
            cases = corpus(port)
            tic = time.time()
            by_status, found, answers = run_corpus(port, cases)
            took = time.time() - tic
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
            deadline = time.time() + 10
            while httpx.get(f"http://127.0.0.1:{port}/health").json()["waiting"] and time.time() < deadline:
                time.sleep(0.05)
            waiting = httpx.get(f"http://127.0.0.1:{port}/health").json()["waiting"]
        finally:
            for name in ("uvicorn", ""):
                logging.getLogger(name).removeHandler(log)
    out, err = capfd.readouterr()
    tracebacks = err.count("Traceback") + sum(r.exc_info is not None for r in log.records)
    errors = [r.getMessage() for r in log.records if r.levelno >= logging.ERROR]
    warnings = sum(r.levelno == logging.WARNING for r in log.records)
    with capfd.disabled():  # shown without -s: the numbers the README quotes
        print(f"\nfuzz: {len(cases)} cases in {took:.1f} s; first answers by status {dict(sorted(by_status.items()))}; "
              f"{tracebacks} tracebacks, {len(errors)} errors and {warnings} warnings in the server log")
    assert len(cases) >= 300
    assert not found, "\n".join(found[:40])
    assert tracebacks == 0 and not errors, (errors[:5], err[-3000:])
    assert health.status_code == 200 and waiting == 0
    assert "reset" not in by_status and "closed" not in by_status, [a for a in answers if isinstance(a[1], str)]


def test_hostile_requests_with_an_api_key(answering, capfd):
    """The same corpus against a server that wants a key (none is given): most are refused before their body
    is read, which races with h11's own refusals. Still no 5xx, all JSON, no tracebacks."""
    log = Records()
    with live(*answering, api_key=KEY) as port:
        logging.getLogger("uvicorn").addHandler(log)
        try:
            by_status, found, _ = run_corpus(port, corpus(port))
        finally:
            logging.getLogger("uvicorn").removeHandler(log)
    err = capfd.readouterr().err
    assert not found, "\n".join(found[:40])
    assert "Traceback" not in err and not [r for r in log.records if r.levelno >= logging.ERROR], err[-3000:]
    assert by_status["200"] <= 20  # the chat page, /health's minimal answer and the preflight-free GETs


def test_wrong_keys_are_refused_with_401_json(answering):
    bad = ["", "Bearer", "Bearer wrong", "Basic Zm9vOmJhcg==", f"bearer {KEY}", f"Bearer  {KEY}", f"Bearer {KEY}x",
           "Bearer " + "k" * 10000, "Bearer \xe9\xe8", f"Bearer {KEY[:-1]}\xe9"]
    with live(*answering, api_key=KEY) as port:
        for given in bad:
            for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/models/x"),
                                 ("GET", "/v1/responses/resp_x"), ("DELETE", "/v1/responses/resp_x")):
                data = request(port, method, path, body=chat({}) if method == "POST" else b"",
                               headers=[f"Authorization: {given}".encode("latin-1")])
                (status, _, body), = parse(exchange(port, data, False)[0])
                assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key", (given, path)
