"""The engine: one worker thread, a queue, the cached prompts."""

import asyncio
import queue
import threading
from typing import Optional

from ..generate import Prompt, stream_generate
from ..memory import cache_budget
from ..models.cache import PromptCache, PromptCachePool

CACHE_SLOTS = 4  # finished requests' caches kept for reuse
PARALLEL = 8  # requests generating at once, time-sliced; each holds its own KV cache
SHUTDOWN = object()  # put in a job's events when the server stops: its client gets a 503 / an error chunk


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


class Engine:
    """Runs the jobs on one worker thread, time-sliced: each round, every active job (up to
    `max_active`) advances by one step of its own generator and its own KV cache, so a new request
    starts at once instead of waiting for the ones before it. Outputs never mix: each job has its
    own queue. Finished caches go back to a PromptCachePool: the newest `cache_slots` of them that fit in
    `cache_bytes` together (default: memory.cache_budget)."""

    def __init__(self, model, tokenizer, cache_slots: int = CACHE_SLOTS, cache_bytes: Optional[int] = None,
                 max_active: int = PARALLEL):
        self.model, self.tokenizer = model, tokenizer
        self.jobs = queue.Queue()
        self.pool = PromptCachePool(cache_slots, cache_budget(model) if cache_bytes is None else cache_bytes)
        self.max_active = max_active
        self.active = 0
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
        return self.jobs.qsize() + self.active

    def _admit(self, active: list):
        """Start the waiting jobs there is room for; block only when there is nothing else to do."""
        while len(active) < self.max_active:
            try:
                job = self.jobs.get(block=not active and not self.closing)
            except queue.Empty:
                return
            if job is None:  # close() woke us
                continue
            if job.cancel.is_set():  # the client left while it waited, or the server is stopping
                job.put(None)
                continue
            try:
                cache = self.pool.take(job.prompt.ids) or PromptCache.new(self.model)
                steps = stream_generate(self.model, self.tokenizer, job.prompt, cache=cache, cancel=job.cancel)
            except Exception as e:  # reported to that request; the worker goes on
                job.put(e)
                job.put(None)
                continue
            active.append((job, steps, cache))

    def _work(self):
        active = []
        while not (self.closing and not active and self.jobs.empty()):
            self._admit(active)
            self.active = len(active)
            for entry in list(active):
                job, steps, cache = entry
                try:
                    job.put(next(steps))
                    continue
                except StopIteration:  # done or cancelled: the cache holds the whole exchange, worth keeping
                    self.pool.put(cache)
                except Exception as e:  # reported to that request; the others go on
                    job.put(e)
                active.remove(entry)
                job.put(None)
            self.active = len(active)
