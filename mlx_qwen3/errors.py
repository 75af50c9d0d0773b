"""The error for bad input: its message is one line saying what is wrong and what to do."""

import sys
from contextlib import contextmanager


class UserError(Exception):
    pass


@contextmanager
def exit_on_user_error():
    """For CLIs: a UserError becomes one line on stderr and exit status 2, never a traceback."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
