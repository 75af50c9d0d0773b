"""Qwen3, Qwen3-MoE and QwQ on Apple silicon with MLX."""

import os
import signal
import sys
import warnings

__version__ = "0.1.0"


def _started_as_a_command() -> bool:
    """`python -m mlx_qwen3[.X]` (sys.argv[0] is "-m" while Python looks for the module) or the
    mlx-qwen3 script; not a program that imports the package."""
    argv = getattr(sys, "argv", None) or [""]
    if argv[0] == "-m":
        python = getattr(sys, "orig_argv", [])
        modules = [arg[2:] or after for arg, after in zip(python, python[1:] + [""]) if arg.startswith("-m")]
        return bool(modules) and modules[0].split(".")[0] == __name__  # -m NAME, or -mNAME
    return os.path.basename(argv[0]) == "mlx-qwen3"


def _leave(*_):
    try:
        os.write(2, b"\n")
    except OSError:
        pass
    os._exit(130)


# A command's Ctrl-C while the modules below import (MLX takes a moment) exits 130 quietly, as a Ctrl-C
# later does, not with a traceback; cli.main() gives the signal back to Python once they are in.
if _started_as_a_command():
    signal.signal(signal.SIGINT, _leave)

# `python -m mlx_qwen3.generate` (or .load) runs a module the imports below have already imported, as
# __main__: runpy warns that it runs twice. Expected here: that second copy only calls cli.main().
warnings.filterwarnings("ignore", category=RuntimeWarning,
                        message=r"'mlx_qwen3\.\w+' found in sys\.modules after import of package 'mlx_qwen3'")

from .errors import UserError  # noqa: E402
from .generate import ChatSession, GenerationResult, stream_generate  # noqa: E402
from .load import load, load_draft, load_model  # noqa: E402

__all__ = ["ChatSession", "GenerationResult", "UserError", "load", "load_draft", "load_model", "stream_generate"]
