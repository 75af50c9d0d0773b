"""Progress while a long prompt is processed: the `progress` callback, the CLI's bar, /health."""

import io
import re
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import serving
from test_cli import pty_run

from mlx_qwen3 import decode
from mlx_qwen3.generate import ChatSession, prepare, stream_generate
from mlx_qwen3.models.cache import PromptCache, common_prefix
from mlx_qwen3.terminal import BAR_FROM, ProgressBar

LONG = "one two three four " * 700  # about 2,800 prompt tokens: over BAR_FROM


def expected_calls(total: int, chunk: int) -> list:
    """Chunks over all but the last token, then the last one."""
    return [(min(k, total - 1), total) for k in range(chunk, total - 1 + chunk, chunk)] + [(total, total)]


def run(model, tok, prompt, cache=None, **options):
    calls = []
    for _ in stream_generate(model, tok, prompt, cache=cache, progress=lambda d, t: calls.append((d, t)),
                             max_tokens=3, enable_thinking=False, **options):
        pass
    return calls


def test_the_callback_follows_the_chunks_and_ends_at_the_total(looping, monkeypatch):
    model, tok = looping
    monkeypatch.setattr(decode, "PREFILL_CHUNK", 64)
    prompt = prepare(model, tok, "a b " * 120, max_tokens=3, enable_thinking=False)
    L = len(prompt.ids)
    assert L > 3 * 64
    cache = PromptCache.new(model)
    calls = []
    for _ in stream_generate(model, tok, prompt, cache=cache, progress=lambda d, t: calls.append((d, t))):
        pass
    assert calls == expected_calls(L, 64)
    assert [d for d, _ in calls] == sorted(set(d for d, _ in calls))  # strictly increasing

    # the same prompt again: the cache holds all but the last token, so there is nothing to process
    assert run(model, tok, "a b " * 120, cache=cache) == []

    # a longer prompt from that cache: only what the cache does not hold counts
    longer = prepare(model, tok, "a b " * 120 + "c d " * 100, max_tokens=3, enable_thinking=False)
    reused = common_prefix(cache.ids, longer.ids)
    calls = run(model, tok, "a b " * 120 + "c d " * 100, cache=cache)
    assert reused > 64 and calls == expected_calls(len(longer.ids) - reused, 64)


def test_a_chat_session_passes_progress_through(looping, monkeypatch):
    model, tok = looping
    monkeypatch.setattr(decode, "PREFILL_CHUNK", 32)
    session = ChatSession(model, tok, enable_thinking=False, max_tokens=3)
    first = []
    session.send("a b " * 50, progress=lambda d, t: first.append((d, t)))
    assert first == expected_calls(len(prepare(model, tok, session.messages[:-1], enable_thinking=False).ids), 32)
    second = []
    session.send("c d " * 50, progress=lambda d, t: second.append((d, t)))
    whole = len(prepare(model, tok, session.messages[:-1], enable_thinking=False).ids)
    # the second turn processes its new tokens, not the history the cache holds (most of the first turn)
    assert second and second == expected_calls(second[-1][1], 32) and second[-1][1] < whole - first[-1][1] // 2


# ---- the bar itself, on a fake terminal ----

class FakeTty(io.StringIO):
    def isatty(self):
        return True


def test_the_bar_redraws_one_line_and_clears_it():
    now = [0.0]
    out = FakeTty()
    bar = ProgressBar(out, clock=lambda: now[0])
    bar(512, BAR_FROM)  # a prompt of BAR_FROM tokens is too short for a bar
    bar.clear()
    assert out.getvalue() == ""
    for done in (1000, 2000, 3000):
        now[0] += 1.0
        bar(done, 10_000)
    text = out.getvalue()
    lines = text.split("\r\x1b[2K")[1:]
    assert lines[0] == "prompt [##..................] 1,000/10,000 tokens"  # no rate yet from one point
    assert lines[-1] == "prompt [######..............] 3,000/10,000 tokens, 1,000 tok/s, 0:07 left"
    assert "\n" not in text  # redrawn in place
    bar.clear()
    assert out.getvalue().endswith("\r\x1b[2K")
    # after clear(), the next prompt (a chat's next turn) starts its own count
    now[0] += 100.0
    bar(1000, 5000)
    now[0] += 0.5
    bar(2000, 5000)
    assert out.getvalue().endswith("2,000/5,000 tokens, 2,000 tok/s, 0:02 left")


def test_the_printer_has_a_bar_only_on_a_terminal_and_not_in_json(monkeypatch):
    from mlx_qwen3.terminal import Printer

    monkeypatch.setattr(sys, "stderr", FakeTty())
    assert Printer(False, False, False).bar is not None
    assert Printer(True, False, False).bar is None
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert Printer(False, False, True).bar is None


# ---- the CLI ----

def test_the_cli_shows_the_bar_on_a_terminal_for_a_long_prompt(looping_dir):
    total = len(prepare(*_load(looping_dir), LONG, enable_thinking=False).ids)
    output, code = pty_run(["--model", str(looping_dir), "--prompt", LONG, "--no-think", "--max-tokens", "4"], [])
    assert code == 0, output
    bars = re.findall(r"prompt \[[#.]{20}\] ([\d,]+)/([\d,]+) tokens", output)
    assert len(bars) >= 2 and {t for _, t in bars} == {f"{total:,}"}, output
    assert bars[-1][0] == f"{total:,}" and "tok/s" in output and " left" in output
    # cleared before the answer: the answer and the stats are not written over the bar's line
    last_bar = [m.end() for m in re.finditer(r"prompt \[[#.]{20}\] [\d,]+/[\d,]+ tokens", output)][-1]
    assert output.index("\r\x1b[2K", last_bar) < output.index("a b", last_bar)


def test_a_short_prompt_has_no_bar(looping_dir):
    output, code = pty_run(["--model", str(looping_dir), "--prompt", "a b " * 20, "--no-think", "--max-tokens", "4"],
                           [])
    assert code == 0 and "a b" in output and "prompt [" not in output, output


@pytest.mark.parametrize("on_tty", [True, False], ids=["json on a terminal", "no terminal"])
def test_no_bar_in_json_or_without_a_terminal(looping_dir, on_tty):
    args = ["--model", str(looping_dir), "--prompt", LONG, "--no-think", "--max-tokens", "4"]
    if on_tty:
        output, code = pty_run(args + ["--json"], [])
    else:
        out = subprocess.run([sys.executable, "-m", "mlx_qwen3.generate", *args], capture_output=True, text=True,
                             timeout=120)
        output, code = out.stdout + out.stderr, out.returncode
    assert code == 0, output
    assert "prompt [" not in output and "\x1b[2K" not in output and "a b" in output


def _load(folder):
    from mlx_qwen3 import load

    return load(str(folder))


# ---- the server ----

def test_health_reports_a_long_prefill_as_it_goes(looping, monkeypatch):
    model, tok = looping
    monkeypatch.setattr(decode, "PREFILL_CHUNK", 32)
    forward = type(model).__call__

    def slow(self, *args, **kwargs):  # a bigger model's pace (and the GIL left to the event loop meanwhile)
        time.sleep(0.01)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "__call__", slow)
    total = len(prepare(model, tok, LONG, enable_thinking=False).ids)
    with serving(model, tok) as url:
        assert httpx.get(f"{url}/health").json()["requests"] == []
        answer = {}

        def ask():
            answer["r"] = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": LONG}], "max_tokens": 2,
                "chat_template_kwargs": {"enable_thinking": False}})

        client = threading.Thread(target=ask)
        client.start()
        seen = []
        while client.is_alive():
            requests = httpx.get(f"{url}/health").json()["requests"]
            seen += [r["processed"] for r in requests]
            assert all(r["prompt_tokens"] == total for r in requests), requests
            time.sleep(0.02)
        client.join()
        assert answer["r"].status_code == 200, answer["r"].text
        assert httpx.get(f"{url}/health").json()["requests"] == []
    partial = [k for k in seen if 0 < k < total]
    assert len(partial) >= 2, seen  # seen mid-prefill, more than once
    assert seen == sorted(seen) and set(partial) <= {min(k, total - 1) for k in range(32, total + 32, 32)}
