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


def run_cli(command):
    """Run a click command so that usage errors, too, are one line with exit status 2."""
    import click

    with exit_on_user_error():
        try:
            code = command.main(standalone_mode=False)
        except click.UsageError as e:
            raise UserError(e.format_message().replace("\n", " ")) from None
        except click.Abort:
            sys.exit(130)
    sys.exit(code or 0)
