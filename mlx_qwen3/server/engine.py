"""The engine: one worker thread, a queue, the cached prompts.

On a model sharded over several ranks, every model call is a collective: every rank must run the same
jobs' steps in the same order. Rank 0's engine decides (it hears the clients) and shares, at the start
of each round, the jobs it starts; the other ranks run the same rounds on them (follow.py)."""

import asyncio
import queue
import threading
from contextlib import ExitStack
from dataclasses import asdict
from typing import Optional

import mlx.core as mx

from .. import distributed, memory
from ..decode import Decoder
from ..generate import Generation, GenerationOptions, Prompt
from ..models.cache import KV_GROUP_SIZES, CacheSetting, KVCache, PromptCache, PromptCachePool

CACHE_SLOTS = 4  # finished requests' caches kept for reuse
PARALLEL = 16  # requests decoded together (the batch width); each holds its own KV cache
SHUTDOWN = object()  # put in a job's events when the server stops: its client gets a 503 / an error chunk
HEARTBEAT = 1.0  # seconds: an idle rank 0 shares an empty round this often (the other ranks wait in it)


class Job:
    def __init__(self, prompt: Prompt, loop):
        self.prompt, self.loop = prompt, loop
        self.cancel = threading.Event()
        self.events = asyncio.Queue()

    def put(self, item):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # its event loop has closed (the server is stopping): nobody is listening
            self.cancel.set()


class Progress:
    """How far a running request's prompt has been processed: written by the worker thread (one int at a
    time), read by /health on the event loop."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens, self.processed = prompt_tokens, 0

    def __call__(self, done: int, total: int):
        self.processed = self.prompt_tokens - total + done  # the tokens reused from a cached prompt count too

    def report(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "processed": self.processed}


class Rounds:
    """The jobs generating together and the cached prompts they start from: the part of the engine every
    rank of a sharded model runs alike (the same starts and steps, in the same order, make the same model
    calls and the same pool decisions on every rank). Each round is one Decoder step: one forward pass for
    every job past its prompt, and a chunk of one joining job's prompt."""

    def __init__(self, model, tokenizer, cache_slots: int, cache_bytes: Optional[int], draft_model=None):
        self.model, self.tokenizer = model, tokenizer
        self.pool = make_pool(model, cache_slots, cache_bytes)
        self.decoder = Decoder(model, draft_model)
        self.active = []  # (job, its Generation, its Progress)
        self.lock = threading.Lock()  # over `active`'s changes: running() reads it from another thread
        self.wired = ExitStack()  # the wired memory limit, held while any job runs

    def start(self, job):
        """Begin `job` from the cached prompt sharing the most with it; a failure is that job's alone."""
        try:
            cache = self.pool.start(self.model, job.prompt.ids, job.prompt.setting)
            progress = Progress(len(job.prompt.ids))
            generation = Generation(self.decoder, self.tokenizer, job.prompt, cache, job.cancel, progress)
        except Exception as e:
            job.put(e)
            job.put(None)
            return
        if not self.active:
            self.wired.enter_context(memory.wired.hold(self.model))
        with self.lock:
            self.active.append((job, generation, progress))

    def drop(self, n: int):
        """Drop the `n` oldest cached prompts (to make room for the jobs starting)."""
        for _ in range(n):
            self.pool.drop_oldest()

    def running(self) -> list:
        """Each active job's prompt processing, as {"prompt_tokens", "processed"}; from any thread."""
        with self.lock:
            return [progress.report() for *_, progress in self.active]

    def step(self):
        """One decoder step for every active job; each one's events go to its client, the finished ones
        leave, their caches to the pool. A failed step fails every job in it (they shared its pass)."""
        if not self.active:
            return
        try:
            self.decoder.step()
        except Exception as e:
            group = distributed.group_of(self.model)
            if group is not None:  # the step may have stopped between collectives: no going on in step
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                distributed.watchdog.fire(f"a generation failed ({reason}); the ranks cannot stay in step", group)
            for job, *_ in self.active:
                job.put(e)
                job.put(None)
            self.decoder.rows.clear()
            self._leave(list(self.active))
            return
        done = []
        for entry in self.active:
            job, generation, progress = entry
            if generation.row.y is not None:  # the prompt is behind it
                progress.processed = progress.prompt_tokens
            for event in generation.drain():
                job.put(event)
            if generation.done:
                job.put(generation.result())
                self.pool.put(generation.cache)  # the whole exchange, worth keeping
                job.put(None)
                done.append(entry)
        self._leave(done)

    def _leave(self, entries: list):
        with self.lock:
            self.active = [e for e in self.active if e not in entries]
        if entries and not self.active:
            self.wired.close()


class Engine:
    """Runs the jobs on one worker thread, decoded together: each round, every active job (up to
    `max_active`, the batch width) advances by one token, or by its accepted drafts, in one forward pass
    for all of them, each with its own KV cache; a new request's prompt is read a chunk per round, so it
    starts at once and stalls nobody. Outputs never mix: each job has its own queue. Finished caches go back to a PromptCachePool: the newest `cache_slots` of them that fit in
    `cache_bytes` together (default: memory.cache_budget).

    A queued job starts when its planned KV cache (its setting, its prompt and max_tokens) fits beside the
    running jobs' and the weights in the memory plan's limit, cached prompts dropped (oldest first) to make
    room; otherwise it waits for one to end, and the jobs behind it wait behind it."""

    def __init__(self, model, tokenizer, cache_slots: int = CACHE_SLOTS, cache_bytes: Optional[int] = None,
                 max_active: int = PARALLEL, draft_model=None):
        self.group = distributed.group_of(model)
        self.jobs = queue.Queue()
        self.held = None  # the first queued job, waiting for memory
        self.rounds = Rounds(model, tokenizer, cache_slots, cache_bytes, draft_model)
        self.pool = self.rounds.pool
        self.args, self.resident = model.args, memory.resident(model)
        self.max_active = max_active
        self.live = set()  # jobs whose client waits for them; touched on the event loop only
        self.closing = False
        self.thread = threading.Thread(target=self._work, daemon=True, name="mlx-qwen3-generation")
        self.thread.start()

    def submit(self, job: Job):
        self.live.add(job)
        self.jobs.put(job)

    def release(self, job: Job):
        """Its client has its answer, or has left: stop it if it still runs."""
        job.cancel.set()
        self.live.discard(job)

    def close(self):
        """Cancel every running and queued generation and tell its client at once (not after the worker's
        current step: a long prompt's prefill may take a while). Called on the event loop."""
        if self.closing:
            return
        self.closing = True
        for job in list(self.live):
            job.cancel.set()
            job.events.put_nowait(SHUTDOWN)
        self.jobs.put(None)  # wakes the worker if it waits for work; it drains the queue and ends

    def stop(self, timeout: float) -> bool:
        """After close(): whether the worker thread ended within `timeout` seconds."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

    @property
    def waiting(self) -> int:
        return self.jobs.qsize() + len(self.rounds.active) + (self.held is not None)

    def running(self) -> list:
        """Per running request, its prompt's tokens and how many are processed; safe from the event loop."""
        return self.rounds.running()

    def decoding(self) -> dict:
        """Since the start: the forward passes made (prompt chunks too) and the tokens they generated (each
        reply's end token too)."""
        decoder = self.rounds.decoder
        return {"forward_passes": decoder.passes, "generated_tokens": decoder.generated,
                "batch_width": self.max_active}

    def _admit(self) -> tuple:
        """The queued jobs there is room for, in order, and how many cached prompts (oldest first) to drop
        for them; block only when there is nothing else to do (sharded: for at most HEARTBEAT seconds, so
        that the round, empty, still reaches the other ranks)."""
        new, drop = [], 0
        while len(self.rounds.active) + len(new) < self.max_active:
            job, self.held = self.held, None
            if job is None:
                idle = not self.rounds.active and not new and not self.closing
                try:
                    job = self.jobs.get(block=idle, timeout=HEARTBEAT if idle and self.group is not None else None)
                except queue.Empty:
                    break
            if job is None:  # close() woke us
                continue
            if job.cancel.is_set():  # the client left while it waited, or the server is stopping
                job.put(None)
                continue
            room = self._room([entry[0] for entry in self.rounds.active] + new + [job], drop)
            if room is None:
                self.held = job  # until a running job ends; none behind it starts first
                break
            new.append(job)
            drop = room
        return new, drop

    def _room(self, jobs: list, drop: int) -> Optional[int]:
        """How many cached prompts (oldest first; `drop` already) to drop for `jobs` to fit together, or
        None: they do not. One job alone always starts (prepare refused one that cannot fit alone)."""
        planned = [memory.planned_bytes(self.args, job.prompt.setting, len(job.prompt.ids),
                                        job.prompt.options.stopping.max_tokens) for job in jobs]
        # the KV caches all at once; the working memory of one step at a time
        need = self.resident.weights + sum(kv for kv, _ in planned) + max(work for _, work in planned)
        sizes = self.pool.sizes()
        held = sum(sizes[drop:])
        while need + held > self.resident.limit and drop < len(sizes):
            held -= sizes[drop]
            drop += 1
        return drop if need + held <= self.resident.limit or len(jobs) == 1 else None

    def _work(self):
        while True:
            new, drop = self._admit()
            done = self.closing and not new and not self.rounds.active and self.jobs.empty()
            if self.group is not None:
                distributed.share({"start": [to_wire(job.prompt) for job in new], "drop": drop, "stop": done},
                                  self.group)
            if done:
                return
            self.rounds.drop(drop)
            for job in new:
                self.rounds.start(job)
            self.rounds.step()


# ---- what the ranks share ----

def to_wire(prompt: Prompt) -> dict:
    """A Prompt as JSON holds it (from_wire rebuilds an equal one)."""
    return asdict(prompt)


def from_wire(wire: dict) -> Prompt:
    """The Prompt to_wire gave."""
    options = GenerationOptions.from_kwargs(**{k: v for group in wire["options"].values() for k, v in group.items()})
    return Prompt(wire["ids"], wire["messages"], wire["thinking"], options, CacheSetting(*wire["setting"]), wire["raw"])


def make_pool(model, slots: int, max_bytes: Optional[int]) -> PromptCachePool:
    """The pool of `slots` cached prompts in `max_bytes` (default: memory.cache_budget). On a sharded
    model, agreed across the ranks: call it on every rank at once."""
    max_bytes = memory.cache_budget(model) if max_bytes is None else max_bytes
    group = distributed.group_of(model)
    if group is None:
        return PromptCachePool(slots, max_bytes)
    # Every take and put must decide alike on every rank (another reuse is another number of model calls:
    # a deadlock). Takes go by ids and the slot count (rank 0's). Puts go by sizes, and real bytes differ by
    # rank (pipeline: other layers; other Macs: other budgets): so an entry is measured by its planned size
    # for the whole model (memory.kv_bytes: its ids, its setting, the config), the same on every rank, and
    # the ranks agree on a limit in that unit: the least any rank's budget holds, each scaled by the most
    # real bytes its share takes per planned byte over the KV settings.
    args = model.args
    with distributed.watchdog.waiting(group, timed=False):  # the ranks start serving when they start
        scale = max(position_bytes(model, bits) / memory.kv_bytes_per_token(args, bits) for bits in kv_choices(model))
    limit = min(distributed.gather(int(max_bytes / scale), group))
    step = KVCache.step  # a cache holds its positions in steps: count them so
    return PromptCachePool(distributed.share(slots, group), limit,
                size=lambda c: memory.kv_bytes(args, c.setting, len(c.ids), -(-len(c.ids) // step) * step))


def kv_choices(model) -> list:
    """The KV bits this model's cache can be made with (a head_dim no group size divides: 16 alone)."""
    head_dim = model.args.dims_per_head
    return [bits for bits in memory.KV_SETTINGS if bits == 16 or any(head_dim % g == 0 for g in KV_GROUP_SIZES)]


def position_bytes(model, kv_bits: int = 16) -> int:
    """The bytes one cached position takes on this rank (its layers, its share of the heads) at `kv_bits`,
    measured on one token: every rank must call it at once (a sharded model's forward has collectives)."""
    cache = PromptCache.new(model, CacheSetting(None if kv_bits == 16 else kv_bits))
    mx.eval(model(mx.array([[0]]), cache=cache.layers), [c.state for c in cache.layers])
    return sum(c.nbytes // c.step for c in cache.layers)  # one token: one step of positions allocated
