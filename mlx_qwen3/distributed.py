"""Several Macs as one, through MLX's own engine (mx.distributed, started by `mlx.launch`): the group,
what the ranks must agree on, and what happens when one is lost (models/shard.py splits the model).

A sharded model gives every rank the same logits; the generator makes rank 0's sampled token (and its
stop flag) everyone's (`agree`), so all ranks feed the same ids by construction. Rank 0 alone reads and
prints (`share`, `reader`, `quiet`); every rank checks at start-up that it runs the same software on
the same files (`check_same`), and a watchdog turns a lost rank into one line and an exit.
"""

import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .errors import UserError

# what mlx.launch sets for the ring and JACCL backends, and what MPI launchers set
LAUNCHED = ("MLX_RANK", "JACCL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


@lru_cache(maxsize=None)
def group() -> Optional[mx.distributed.Group]:
    """The group `mlx.launch` (or mpirun) set up for this process, or None when it runs alone."""
    # Only a launched process starts a backend: MPI, say, would otherwise initialise in every plain run.
    if not any(os.environ.get(v) for v in LAUNCHED) or not mx.distributed.is_available():
        return None
    g = mx.distributed.init()
    return g if g.size() > 1 else None


def rank() -> int:
    g = group()
    return 0 if g is None else g.rank()


def group_of(model) -> Optional[mx.distributed.Group]:
    """The group a model was sharded across (None: it is whole on this process)."""
    return getattr(model, "group", None)


def agree(values: mx.array, g: Optional[mx.distributed.Group]) -> mx.array:
    """Rank 0's `values` on every rank (the others' are ignored): one all_sum of a few bytes."""
    if g is None:
        return values
    # `values * 0`, not zeros: a contribution that depends on nothing could be sent before this rank's
    # earlier collectives, and pair with another one on rank 0 (the ranks must run them in one order)
    return mx.distributed.all_sum(values if g.rank() == 0 else values * 0, group=g)


def share(obj=None, g: Optional[mx.distributed.Group] = None, patient: bool = False):
    """Rank 0's `obj` (anything JSON holds) on every rank; the others pass nothing. Two all_sums
    (the length, then the bytes), evaluated at once: every rank must call it at the same point.
    `patient`: rank 0 may take its time (a person typing): the watchdog does not count the wait."""
    g = g or group()
    if g is None:
        return obj
    data = json.dumps(obj).encode() if g.rank() == 0 else b""
    with watchdog.waiting(g, timed=not patient):
        n = agree(mx.array([len(data)], dtype=mx.int32), g).item()
    with watchdog.waiting(g):
        payload = mx.array(np.frombuffer(data, np.uint8)) if g.rank() == 0 else mx.zeros((n,), dtype=mx.uint8)
        return json.loads(bytes(agree(payload, g).tolist()).decode())


# ---- a lost rank: one line and an exit, never a hang ----

# seconds without an answer; at least 5: an idle server's rank 0 speaks every second (engine.HEARTBEAT)
PEER_TIMEOUT = max(5.0, float(os.environ.get("MLX_QWEN3_PEER_TIMEOUT", 30)))


class Watchdog:
    """Watches the waits for results that need the other ranks (`with watchdog.waiting():`). When a rank
    dies its links close, and MLX raises; when a link drops silently, or a rank stops answering, nothing
    does: after PEER_TIMEOUT seconds without an answer the watchdog ends the process. Either way one line
    names the rank lost, and the process exits with status 1 (mlx.launch then stops the other ranks)."""

    def __init__(self):
        self.since, self.depth, self.group = None, 0, None
        self.thread = None

    @contextmanager
    def waiting(self, g, timed: bool = True):
        """Around a wait for the other ranks. `timed`: no answer within PEER_TIMEOUT is a fault (not for
        waits that may take any time: a person typing, the slowest rank loading); a closed link always is."""
        if g is None:
            yield
            return
        self.group = g
        if not timed:
            with self._closed_link(g):
                yield
            return
        self.depth += 1
        self.since = time.monotonic()
        if self.thread is None:
            self.thread = threading.Thread(target=self._watch, daemon=True, name="mlx-qwen3-watchdog")
            self.thread.start()
        try:
            with self._closed_link(g):
                yield
        finally:
            self.depth -= 1
            self.since = None if self.depth == 0 else time.monotonic()

    @contextmanager
    def _closed_link(self, g):
        try:
            yield
        except RuntimeError as e:
            if "connection to a peer was lost" in str(e) or "[ring]" in str(e) or "[jaccl]" in str(e):
                self.fire(f"lost {_others(g, neighbours=True)}: its connection closed (the process ended, "
                          "or the link dropped)")
            raise

    def beat(self):
        """Progress inside a long wait (a long prompt's chunks): the time without an answer starts again."""
        if self.since is not None:
            self.since = time.monotonic()

    def _watch(self):
        while True:
            time.sleep(min(1.0, PEER_TIMEOUT / 4))
            since = self.since
            if since is not None and time.monotonic() - since > PEER_TIMEOUT:
                self.fire(f"no answer from {_others(self.group)} for {PEER_TIMEOUT:g} s (it stopped, "
                          "or its link dropped)")

    def on_sigterm(self, g):
        """mlx.launch stops the other ranks with SIGTERM when one ends with an error: say so, in the same
        one line, instead of vanishing."""
        import signal

        self.group = g
        ended = f"{_others(g)} ended" if g.size() == 2 else "another rank ended (mlx.launch names it above)"
        signal.signal(signal.SIGTERM, lambda *_: self.fire(f"{ended}; mlx.launch stopped this one"))

    def fire(self, what: str, g=None):
        g = g or self.group
        line = f"mlx-qwen3 rank {g.rank()} of {g.size()}: {what}; stopping\n"
        try:
            os.write(2, line.encode())
        finally:
            os._exit(1)


def _others(g, neighbours: bool = False) -> str:
    r, n = g.rank(), g.size()
    if n == 2:
        return f"rank {1 - r}"
    if neighbours:  # a ring: this rank talks to the ranks beside it only
        return f"rank {(r - 1) % n} or rank {(r + 1) % n}"
    return "one of ranks " + ", ".join(str(i) for i in range(n) if i != r)


watchdog = Watchdog()


# ---- the same files and software on every rank ----

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def fingerprint(folder: Path) -> dict:
    """What must match across ranks: the software, and the model folder's config, tokenizer and weight files."""
    from . import __version__
    from .checkpoint import safetensors_header, weight_files

    package = hashlib.sha256()
    for f in sorted(Path(__file__).parent.rglob("*.py")):
        package.update(f.read_bytes())
    files = hashlib.sha256((folder / "config.json").read_bytes())
    # the tokenizer's files too: another template or eos on one rank is another prompt or end there (a desync)
    extra = folder / "additional_chat_templates"
    for name in TOKENIZER_FILES + tuple(sorted(f"{extra.name}/{f.name}" for f in extra.glob("*.jinja"))):
        f = folder / name
        files.update(name.encode() + (hashlib.sha256(f.read_bytes()).digest() if f.is_file() else b"absent"))
    for f in weight_files(folder):  # each header names every tensor, its shape, dtype and offsets
        header = json.dumps(safetensors_header(f), sort_keys=True)
        files.update(f.name.encode() + header.encode() + str(f.stat().st_size).encode())
    return {
        "software": f"mlx-qwen3 {__version__}, mlx {mx.__version__}, sources {package.hexdigest()[:12]}",
        "model files": files.hexdigest()[:12],
    }


def gather(obj, g: mx.distributed.Group) -> list:
    """Every rank's `obj` (anything JSON holds), in rank order, on every rank."""
    data = json.dumps(obj).encode()
    with watchdog.waiting(g, timed=False):  # ranks start when they start
        sizes = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), group=g).tolist()
        padded = mx.array(np.frombuffer(data.ljust(max(sizes)), np.uint8))[None]
        rows = mx.distributed.all_gather(padded, group=g).tolist()
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def check_same(path, g: mx.distributed.Group) -> Path:
    """Every rank finds the model folder `path` and runs the same software on the same files as rank 0,
    or every rank refuses to start; rank 0 says why, in one line (the others' failures included).
    Returns the folder."""
    from .checkpoint import resolve

    try:
        folder = resolve(str(path))
        mine = fingerprint(folder)
    except UserError as e:
        folder, mine = None, {"error": str(e)}
    every = gather(mine, g)
    for r, theirs in enumerate(every):
        if "error" in theirs:
            problem = f"rank {r}: {theirs['error']}"
        else:
            differs = [k for k in every[0] if k != "error" and theirs.get(k) != every[0][k]]
            if not differs:
                continue
            problem = (f"rank {r} has other {' and '.join(differs)} than rank 0 ({theirs[differs[0]]} vs "
                       f"{every[0][differs[0]]}); install the same mlx-qwen3 and mlx, and copy the same model "
                       "folder, on every Mac")
        raise UserError(problem) if g.rank() == 0 else SystemExit(2)  # rank 0 alone says it
    return folder


def barrier(g: mx.distributed.Group):
    """Every rank gets here before any goes on, however long the slowest takes (one Mac reading its share
    of the weights from a slower disk is no fault): not timed by the watchdog."""
    with watchdog.waiting(g, timed=False):
        mx.eval(mx.distributed.all_sum(mx.array(0), group=g))


def quiet():
    """Rank 0 alone prints: the others' stdout and stderr go nowhere (what they would say, rank 0 says;
    a lost rank is reported by the watchdog, which writes to the file descriptor itself)."""
    import sys

    sys.stdout = sys.stderr = open(os.devnull, "w")


def reader(read, g: Optional[mx.distributed.Group]):
    """`read(prompt)` (e.g. input) on rank 0, its lines given to every rank: what a REPL reads, rank 0
    reads. End of input and Ctrl-C on rank 0 end every rank's REPL; the others' as an end of input (exit 0:
    rank 0 says how it ended, and another rank ending non-zero first would make mlx.launch stop rank 0)."""
    if g is None:
        return read

    def shared(prompt: str = "") -> str:
        if g.rank() == 0:
            try:
                line = read(prompt)
            except (EOFError, KeyboardInterrupt) as e:
                share({"end": type(e).__name__}, g)
                raise
            return share({"line": line}, g)["line"]
        got = share(None, g, patient=True)
        if "end" in got:
            raise EOFError
        return got["line"]

    return shared
