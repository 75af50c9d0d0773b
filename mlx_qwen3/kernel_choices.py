"""The kernel dispatcher's measured choices, stored per machine and version (kernels.store()).

A file FOLDER/kernels-HASH.json per machine(): the chip, macOS, MLX, this package and the kernel
sources, so a new version or an edited kernel measures again. Unreadable or unwritable files cost a
warning and a new measurement, never a crash.
"""

import hashlib
import json
import logging
import os
import platform
from pathlib import Path

import mlx.core as mx

log = logging.getLogger(__name__)


def error_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx_qwen3"


def machine(sources: Path) -> dict:
    """What a measured choice holds for: the chip, macOS, MLX, this package and the .metal files in
    `sources`."""
    from . import __version__

    info = mx.device_info(mx.gpu) if mx.metal.is_available() else {}
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(sources.glob("*.metal")))).hexdigest()[:12]
    return {"chip": info.get("device_name", platform.machine()), "gpu": info.get("architecture", ""),
            "os": platform.mac_ver()[0] or platform.platform(), "mlx": mx.__version__, "mlx_qwen3": __version__,
            "kernel_sources": digest}


class ChoiceStore:
    """The measured choices of one machine and version: FOLDER/kernels-HASH.json, HASH naming
    `machine`."""

    def __init__(self, folder: Path, machine: dict):
        self.machine = machine
        tag = hashlib.sha1(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:12]
        self.path = folder / f"kernels-{tag}.json"
        self.choices = self._read()
        self._warned = False

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            choices = data["choices"]
            ok = all(isinstance(c.get("custom"), bool) and isinstance(c.get("custom_us"), (int, float))
                     and isinstance(c.get("builtin_us"), (int, float)) for c in choices.values())
            if data.get("machine") == self.machine and ok:
                return dict(choices)
            log.warning("ignoring %s: not a kernel choice file of this machine; measuring again", self.path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring %s (%s); measuring again", self.path, error_line(e))
        return {}

    def get(self, key: str):
        return self.choices.get(key)

    def put(self, key: str, choice: dict):
        self.choices[key] = choice
        try:  # merge with what other processes stored meanwhile, then replace the file atomically
            self.choices = {**self._read(), **self.choices}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"machine": self.machine, "choices": self.choices}, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as e:
            if not self._warned:
                log.warning("cannot store kernel choices in %s (%s); they are measured again next run",
                            self.path.parent, error_line(e))
                self._warned = True
