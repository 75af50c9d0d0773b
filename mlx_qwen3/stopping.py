"""How a reply ends: a thought closed at its budget or when it loops (ThinkingBudget), an answer cut where it
starts repeating itself (AnswerLoops), and stop strings (StopStrings). stream_generate drives them."""

from collections import deque
from typing import Optional

from .loop_guard import REPEAT, Loop, LoopGuard
from .options import NUDGE, Stopping
from .thinking import ANSWER, THINKING, Event


class ThinkingBudget:
    """Ends a thought by feeding a wrap-up sentence, </think> and a blank line (`forced`, which generate_step
    feeds instead of sampled tokens): when it reaches its budget, or when the loop guard finds it looping a
    second time. The first loop gets a nudge (NUDGE), and from then on the thought keeps room for the answer
    as a budget does. `loops`: what the guard did, as GenerationResult reports it."""

    def __init__(self, tokenizer, stopping: Stopping, max_tokens: int, guard: Optional[LoopGuard] = None):
        self.forced = deque()
        self.ending, self.nudge, self.budget, self.thought = [], [], None, 0
        self.guard, self.loops = None, []
        self.forcing = 0  # of the next tokens, those that are ours (not the model's: never fed to the guard)
        end = tokenizer.token_id("</think>")
        if end is None or (stopping.thinking_budget is None and guard is None):
            return
        self.ending = tokenizer.encode(stopping.wrap_up) + [end] + tokenizer.encode("\n\n")
        reserve = max(1, min(512, max_tokens // 4))  # room kept for the answer
        self.limit = max(0, max_tokens - len(self.ending) - reserve)
        if stopping.thinking_budget is not None:
            self.budget = min(stopping.thinking_budget, self.limit)
        if guard is not None:
            self.guard, self.nudge = guard, tokenizer.encode(NUDGE)

    def step(self, before: str, after: str, token: Optional[int] = None, position: int = 0):
        """After `token` (the `position`th generated) took the router from state `before` to `after`."""
        ours = token is not None and self.forcing > 0
        self.forcing -= ours
        in_thought = before == THINKING and after == THINKING
        self.thought += in_thought
        if self.guard is not None and token is not None and not ours:
            if in_thought:
                loop = self.guard.feed(token)
                if loop is not None:
                    self._loop(loop, position)
            elif after == THINKING:  # a thought starts
                self.guard.reset()
        if self.budget is not None and after == THINKING and self.thought >= self.budget:
            self._close()

    def _loop(self, loop: Loop, position: int):
        room = self.limit if self.budget is None else self.budget
        if self.nudged or self.thought + len(self.nudge) >= room:  # again, or too late to try
            self.loops.append(_report(THINKING, loop, position, "closed"))
            self._close()
            return
        self.loops.append(_report(THINKING, loop, position, "nudged"))
        self._force(self.nudge)
        self.budget = room  # a thought that has looped keeps room for the answer, as a budget does

    @property
    def nudged(self) -> bool:
        return any(r["action"] == "nudged" for r in self.loops)

    def _close(self):
        self._force(self.ending)
        self.budget, self.guard = None, None  # the thought ends: nothing more to watch

    def _force(self, ids: list):
        self.forced.extend(ids)
        self.forcing += len(ids)


class AnswerLoops:
    """What goes out of the answer channel. Holds back the events of the answer's latest tokens while those
    may be a copy in progress of the text before them (LoopGuard.pending), and ends the answer at the start
    of a second copy: the repeated text is never given out twice. `text`: the answer that went out."""

    def __init__(self, guard: Optional[LoopGuard]):
        self.guard = guard
        self.held = deque()  # (the guard's position of a token, the events it made)
        self.loops, self.text = [], ""

    def feed(self, token: int, events: list, position: int) -> tuple:
        """An answer token (the `position`th generated) and its events -> (events to give out, whether the
        answer ends)."""
        if self.guard is None:
            return self._out(events), False
        self.held.append((len(self.guard.ids), events))
        loop = self.guard.feed(token)
        if loop is None:
            keep = self.guard.pending
            return self._out([e for _ in range(len(self.held) - keep) for e in self.held.popleft()[1]]), False
        self.loops.append(_report(ANSWER, loop, position, "stopped"))
        # a repeat: what is held from its second copy on is dropped; a recurring line is out already: stop there
        out = [e for p, events in self.held if loop.kind != REPEAT or p < loop.second for e in events]
        self.held.clear()
        return self._out(out), True

    def release(self, events: list = ()) -> list:
        """Everything held, then `events` (the answer ends, or a tool call, a thought or a stop string comes);
        the next answer tokens are watched afresh."""
        out = [e for _, held in self.held for e in held] + list(events)
        self.held.clear()
        if self.guard is not None and self.guard.ids:
            self.guard.reset()
        return self._out(out)

    def _out(self, events: list) -> list:
        self.text += "".join(e.text for e in events if e.type == ANSWER)
        return events


def _report(channel: str, loop: Loop, position: int, action: str) -> dict:
    return {"channel": channel, "kind": loop.kind, "period": loop.period, "position": position, "action": action}


class StopStrings:
    """Cuts the answer at the first stop string; text that may be the start of one is held back. `hit`: the stop
    string that ended the answer (None: none did)."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held, self.hit = "", None

    def cut(self, events: list, last: bool = False) -> list:
        """The router's events with the answer cut (`last`: let go of what was held)."""
        out = []
        for event in events:
            if event.type == "answer":
                text = "" if self.hit else self._feed(event.text) + (self._flush() if last else "")
                event = Event("answer", text)
            if event.text or event.tool_call:
                out.append(event)
        return out

    def _feed(self, text: str) -> str:
        buf = self.held + text
        found = [(i, s) for i, s in ((buf.find(s), s) for s in self.stops) if i >= 0]
        if found:
            at, self.hit = min(found, key=lambda f: f[0])
            self.held = ""
            return buf[:at]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep]

    def _flush(self) -> str:
        out, self.held = self.held, ""
        return out
