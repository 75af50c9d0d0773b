"""The terminal side of `mlx-qwen3 generate`: showing a stream of events, reading the prompt, the chat REPL.

Its promises under faults: bad input (a prompt that is not UTF-8) is one line; in --chat a bad line is one
line and the session goes on. Ctrl-C stops a reply (exit status 130), a second one stops at once.
"""

import codecs
import json
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Optional

from .errors import UserError
from .generate import ChatSession, GenerationResult, check_text

DIM, RESET = "\x1b[2m", "\x1b[0m"
BAR_FROM = 2000  # prompt tokens to process: a shorter prompt is done before a bar would help


class ProgressBar:
    """One line on a terminal while a long prompt is processed (tokens done, tok/s, time left), redrawn in
    place; stream_generate's `progress` callback. clear() erases it (the answer starts)."""

    def __init__(self, stream, clock=time.perf_counter):
        self.stream, self.clock = stream, clock
        self.first = None  # (time, done) at this prompt's first call: the rate counts from there
        self.shown = False

    def __call__(self, done: int, total: int):
        if total <= BAR_FROM:
            return
        now = self.clock()
        if self.first is None:
            self.first = (now, done)
        t0, d0 = self.first
        rate = (done - d0) / (now - t0) if now > t0 and done > d0 else None
        filled = 20 * done // total
        line = f"prompt [{'#' * filled}{'.' * (20 - filled)}] {done:,}/{total:,} tokens"
        if rate:
            line += f", {rate:,.0f} tok/s, {_duration((total - done) / rate)} left"
        self.stream.write("\r\x1b[2K" + line)
        self.stream.flush()
        self.shown = True

    def clear(self):
        if self.shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
        self.first, self.shown = None, False


class ConvertBar(ProgressBar):
    """One line on a terminal while convert writes its tensors (tensors and bytes written, time left),
    redrawn at most 10 times a second: a tensor can take a millisecond, a flush per tensor would not."""

    EVERY = 0.1  # seconds between redraws

    def __init__(self, stream, clock=time.perf_counter):
        super().__init__(stream, clock)
        self.drawn = None  # when the line was last drawn

    def __call__(self, tensors: int, total_tensors: int, nbytes: int, total_bytes: int):
        now = self.clock()
        if self.first is None:
            self.first = (now, nbytes)
        elif tensors < total_tensors and now - self.drawn < self.EVERY:
            return
        t0, b0 = self.first
        rate = (nbytes - b0) / (now - t0) if now > t0 and nbytes > b0 else None
        filled = 20 * nbytes // max(1, total_bytes)
        line = (f"convert [{'#' * filled}{'.' * (20 - filled)}] {tensors:,}/{total_tensors:,} tensors, "
                f"{_bytes(nbytes)}/{_bytes(total_bytes)}")
        if rate:
            line += f", {_duration((total_bytes - nbytes) / rate)} left"
        self.stream.write("\r\x1b[2K" + line)
        self.stream.flush()
        self.drawn, self.shown = now, True


@contextmanager
def convert_progress(stream):
    """convert's `progress` callback: a ConvertBar where `stream` is a terminal (None elsewhere: logs and
    pipes get nothing), erased at the end, whatever ended it."""
    bar = ConvertBar(stream) if _isatty(stream) else None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.clear()


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Printer:
    """Shows events: on a terminal thinking is dimmed and labelled; --json gives one object per line.
    `bar`: the progress bar for a long prompt, when stderr is a terminal (never with --json); None otherwise."""

    def __init__(self, as_json: bool, hide_thinking: bool, tty: bool):
        self.as_json, self.hide_thinking, self.tty = as_json, hide_thinking, tty
        self.channel = None
        self.bar = None if as_json or not _isatty(sys.stderr) else ProgressBar(sys.stderr)
        # JSON escapes what a stdout that is not UTF-8 cannot show (plain text: see prepare_stdout)
        self.ascii = not _is_utf8(getattr(sys.stdout, "encoding", None))

    def show(self, event) -> Optional[GenerationResult]:
        out = sys.stdout
        if self.bar is not None:
            self.bar.clear()
        if self.as_json:
            if event.type == "done":
                record = {k: v for k, v in vars(event).items() if k != "text"}
            else:
                record = {"type": event.type, "text": event.text}
                if event.tool_call is not None:
                    record["tool_call"] = event.tool_call
            if event.type != "thinking" or not self.hide_thinking:
                print(json.dumps(record, ensure_ascii=self.ascii), flush=True)
            return event if event.type == "done" else None
        if event.type == "done":
            self._enter(None)
            print(file=out, flush=True)
            if event.rescaled_from is not None:
                was = "plain RoPE" if event.rescaled_from == 1 else f"YaRN x{event.rescaled_from:g}"
                note(f"the conversation outgrew {was}: its context was processed again with YaRN x{event.rope_factor:g}")
            if event.loops:
                note(_loops(event.loops))
            print(_stats(event), file=sys.stderr)
            return event
        if event.type == "thinking" and self.hide_thinking:
            return None
        self._enter(event.type)
        if event.type == "tool_call":
            call = event.tool_call
            text = f"[tool call] {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})"
            if call.get("error"):
                text = f"[tool call, {call['error']}] {event.text}"
            out.write(text + "\n")
        else:
            out.write(event.text)
        out.flush()
        return None

    def abandon(self):
        """A stream cut short (a second Ctrl-C, a failed write): on a terminal, end the dimming, so that
        the shell's prompt is not left dim."""
        if self.bar is not None:
            try:
                self.bar.clear()
            except Exception:  # stderr is what failed: nothing more to show
                pass
        if self.tty and not self.as_json and self.channel == "thinking":
            try:
                sys.stdout.write(RESET + "\n")
                sys.stdout.flush()
            except Exception:  # the stream is what failed: nothing more to show
                pass
        self.channel = None

    def _enter(self, channel):
        """Open or close the thinking block when the channel changes."""
        if channel == self.channel:
            return
        out = sys.stdout
        if self.channel == "thinking":
            out.write(RESET + "\n\n" if self.tty else "\n</think>\n\n")
        elif self.channel == "answer" and channel == "tool_call":
            out.write("\n")
        if channel == "thinking":
            out.write(DIM + "Thinking:\n" if self.tty else "<think>\n")
        self.channel = channel


_ACTIONS = {"nudged": "nudged the thought", "closed": "closed the thought", "stopped": "stopped the answer"}


def _loops(loops: list) -> str:
    """What the loop guard did, in one line."""
    said = []
    for r in loops:
        what = (f"a {r['period']}-token span repeated" if r["kind"] == "repeat"
                else f"a line recurring every {r['period']} tokens")
        said.append(f"{_ACTIONS[r['action']]} at token {r['position']} ({what})")
    return "loop guard: " + "; ".join(said)


def _stats(r: GenerationResult) -> str:
    return (f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
            f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
            f"peak memory: {r.peak_memory:.2f} GB | finish: {r.finish_reason}"
            + (f" | YaRN x{r.rope_factor:g}" if r.rope_factor != 1 else "")
            + (f" | drafts: {r.accepted_tokens} of {r.drafted_tokens} accepted, "
               f"{r.generation_tokens / max(1, r.forward_passes - 1):.2f} tokens per pass" if r.drafted_tokens else ""))


def show_stream(events, printer: Printer, cancel) -> GenerationResult:
    """Print a stream; the first Ctrl-C cancels generation cleanly, a second one stops at once."""
    def on_sigint(*_):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    # a process told to ignore Ctrl-C (a rank other than 0: rank 0's stop reaches it) keeps ignoring it
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else on_sigint)
    try:
        result = None
        for event in events:
            result = printer.show(event) or result
        return result
    except BaseException:
        printer.abandon()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        if hasattr(events, "close"):
            events.close()  # now, not when the garbage collector gets to it


def note(text: str):
    """One line on stderr, dimmed on a terminal."""
    print(DIM + text + RESET if _isatty(sys.stderr) else text, file=sys.stderr)


def _isatty(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # not a file, or a closed one
        return False


def _is_utf8(encoding: Optional[str]) -> bool:
    try:
        return codecs.lookup(encoding or "").name == "utf-8"
    except LookupError:
        return False


def prepare_stdout():
    """Text a stdout that is not UTF-8 cannot encode (a latin-1 locale, PYTHONIOENCODING=ascii) is
    written as backslash escapes, not a UnicodeEncodeError. Lone surrogates never reach it."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and not _is_utf8(getattr(sys.stdout, "encoding", None)):
        reconfigure(errors="backslashreplace")


def read_stdin() -> str:
    """All of stdin, as the prompt. Bytes that are not text in stdin's encoding (UTF-8, as a rule) are
    refused, not replaced: a prompt must not change meaning unseen. Newlines as text mode reads them."""
    encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # stdin replaced by a text stream: it has decoded already
        return sys.stdin.read()
    data = buffer.read()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        name = "UTF-8" if _is_utf8(encoding) else encoding
        raise UserError(f"stdin is not valid {name}: byte 0x{data[e.start]:02x} at offset {e.start}; "
                        f"convert it first (e.g. iconv -f latin1 -t utf-8)") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def repl(session: ChatSession, printer: Printer, first: Optional[str], read=input) -> int:
    """The --chat loop, from `first` (the --prompt, if any) on; `read` (input) gives the lines. Returns
    the exit status."""
    commands = "/think, /no_think, /budget N (or off), /reset, /exit"
    print(f"chat: {commands}; Ctrl-C stops a reply, Ctrl-D leaves", file=sys.stderr)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 arrives, to be refused alone
        sys.stdin.reconfigure(errors="surrogateescape")
    line = first
    while True:
        if line is None:
            try:
                line = read(">>> ")
            except EOFError:
                return 0
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return 130
            except UnicodeDecodeError as e:  # only where stdin could not be reconfigured
                print(f"error: that line is not valid {e.encoding}; nothing was sent", file=sys.stderr)
                continue
        line, text = None, line.strip()
        if not text:
            continue
        try:
            check_text(text, "that line")
        except UserError as e:
            print(f"error: {e}; nothing was sent", file=sys.stderr)
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            session.reset()
        elif text in ("/think", "/no_think"):
            session.options["enable_thinking"] = text == "/think"
        elif text.startswith("/budget"):
            arg = (text.split()[1:] or ["?"])[0]
            if arg == "off":
                session.options["thinking_budget"] = None
            elif (budget := _count(arg)) is not None:
                session.options["thinking_budget"] = budget
            else:
                print("usage: /budget N, or /budget off", file=sys.stderr)
        elif text.startswith("/") and text.split()[0] in ("/help", "/?"):
            print(commands, file=sys.stderr)
        else:
            cancel = threading.Event()
            try:
                show_stream(session.stream(text, cancel=cancel, progress=printer.bar), printer, cancel)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
            printer.channel = None


def _count(text: str) -> Optional[int]:
    """A whole number >= 0 written in digits, or None ("²" is a digit to str.isdigit, not to int)."""
    try:
        return int(text) if text.isdigit() else None
    except ValueError:  # that, or more digits than int() reads (4,300)
        return None
