"""The error for bad input: its message is one line saying what is wrong and what to do."""

import errno
import os
import sys
from contextlib import contextmanager
from typing import Optional

# A writer whose reader went away (`... | head`) exits as if SIGPIPE had ended it, without a word:
# 128 + 13 is what a shell reports for such a command, so `set -o pipefail` sees what it sees for `yes | head`.
EXIT_BROKEN_PIPE = 141


class UserError(Exception):
    """Bad input. `param` names the argument at fault when there is one (the server answers it as OpenAI's
    `param`); `code` says what kind of fault it is (invalid_type, out_of_range, ...)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param, self.code = param, code


def show(value, n: int = 40) -> str:
    """A value for a one-line message: repr, cut short (a 4 MB value is not echoed back)."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


class OutputError(Exception):
    """Writing to stdout failed: the reader went away (errno EPIPE) or the disk is full (ENOSPC)...

    Not an OSError, so that code handling its own files' errors does not take it for one of theirs."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))
        self.errno = error.errno


class _Guarded:
    """A standard stream whose write errors are told apart: stdout's become OutputError; stderr's are
    dropped (an error that cannot be shown must not change how the command ends). Everything else
    (fileno, isatty, encoding, buffer, reconfigure...) is the stream's own."""

    def __init__(self, stream, drop: bool):
        self._stream, self._drop = stream, drop
        try:
            self._fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a file (a test's capture, say)
            self._fd = None

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def _failed(self, error: OSError):
        if self._fd is not None:
            _discard(self._fd)  # what is still buffered goes nowhere, so the flush at exit does not fail again
        if not self._drop:
            raise OutputError(error) from None

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            self._failed(e)
            return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        try:
            self._stream.flush()
        except OSError as e:
            self._failed(e)


def _discard(fd: int):
    """Point `fd` at /dev/null."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except OSError:
        pass


def _open_closed_streams():
    """A standard stream closed by the caller (`<&-`, `>&-`, `2>&-`) becomes /dev/null: else the next file
    opened takes its number (MLX then fails to load a checkpoint opened as fd 0; a stray write to fd 1 or
    2 would land in a file being written), and Python's sys.stdin/stdout/stderr are None."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
            continue
        except OSError as e:
            if e.errno != errno.EBADF:
                continue
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


@contextmanager
def exit_on_user_error():
    """For CLIs: a UserError becomes one line on stderr and exit status 2, never a traceback."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_cli(command):
    """Run a click command so that usage errors, too, are one line with exit status 2. A stdout whose
    reader went away ends it quietly with EXIT_BROKEN_PIPE; another failure to write stdout (a full disk)
    is one line, "error: cannot write the output: ...", and exit status 1. Never a traceback."""
    import click

    streams = None
    try:
        _open_closed_streams()
        streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = (s if s is None else _Guarded(s, drop) for s, drop in zip(streams, (False, True)))
        try:
            with exit_on_user_error():
                try:
                    code = command.main(standalone_mode=False)
                except click.UsageError as e:
                    raise UserError(e.format_message().replace("\n", " ")) from None
                except click.Abort:
                    code = 130
            if sys.stdout is not None:
                sys.stdout.flush()  # what is still buffered: its failure is reported here, not at exit
        except OutputError as e:
            if e.errno == errno.EPIPE:
                sys.exit(EXIT_BROKEN_PIPE)
            print(f"error: cannot write the output: {e}", file=sys.stderr)
            sys.exit(1)
        sys.exit(code or 0)
    except KeyboardInterrupt:  # a Ctrl-C just outside the command, where click does not see it
        print(file=sys.stderr)
        sys.exit(130)
    finally:
        if streams is not None:
            try:
                if sys.stdout is not None:
                    sys.stdout.flush()  # leaving with another status: a failure now only discards the rest
            except OutputError:
                pass
            sys.stdout, sys.stderr = streams
