"""The server on the ranks other than 0 of a sharded model: no port, no clients. Each round, it starts
the jobs rank 0's engine shares and steps every active job once, as rank 0 does (the same model calls
in the same order), and drops the events: rank 0 answers the clients."""

from typing import Optional

from .. import distributed
from .engine import CACHE_SLOTS, Rounds, from_wire


class Unheard:
    """A job nobody listens to. It needs no cancel flag: rank 0's reaches its generator at every step."""

    cancel = None

    def __init__(self, prompt):
        self.prompt = prompt

    def put(self, item):
        pass


def follow(model, tokenizer, cache_slots: int = CACHE_SLOTS, cache_bytes: Optional[int] = None, draft_model=None):
    """Run rank 0's server rounds on this rank until rank 0's engine stops.

    Args:
        model: this rank's share of the model rank 0 serves (`load` in the same launch).
        cache_slots, cache_bytes: as given to rank 0's server; the ranks agree on one pool limit.
        draft_model: as rank 0's (whole on every rank).
    """
    group = distributed.group_of(model)
    rounds = Rounds(model, tokenizer, cache_slots, cache_bytes, draft_model)
    while True:
        message = distributed.share(None, group)
        if message["stop"]:
            return
        rounds.drop(message["drop"])  # what rank 0 dropped to make room for these starts
        for wire in message["start"]:
            rounds.start(Unheard(from_wire(wire)))
        rounds.step()
