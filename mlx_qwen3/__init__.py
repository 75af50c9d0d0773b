"""Qwen3, Qwen3-MoE and QwQ on Apple silicon with MLX."""

import importlib
import sys
import types

__version__ = "0.1.0"

# Public name -> the module that defines it, imported on first use so that
# `python -m mlx_qwen3.load` (or .generate, .convert) runs its module once, not twice.
_EXPORTS = {
    "load": "load",
    "load_model": "load",
    "generate": "generate",
    "stream_generate": "generate",
    "ChatSession": "generate",
    "UserError": "errors",
}
__all__ = list(_EXPORTS)


class _Package(types.ModuleType):
    def __getattr__(self, name):
        if name in _EXPORTS:
            return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __setattr__(self, name, value):
        # Importing the submodule `load` (or `generate`) must not hide the function of that name.
        # (So `import mlx_qwen3.generate as m` gives the function, as with mlx-lm: use importlib.)
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
