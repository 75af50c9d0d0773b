"""A menubar assistant for macOS: `python -m mlx_qwen3.menubar --model M` (needs the `menubar` extra).

The logic is AssistantController, a plain class with no UI toolkit in it (the tests drive it on
Linux); MenubarApp is the thin rumps layer that shows the controller's state.
"""

import threading
from typing import Optional

from .errors import UserError
from .generate import ChatSession


class AssistantController:
    """Ask, stream, stop, toggle thinking, start over. Generation runs on a background thread; a UI
    reads `snapshot()` on its own timer, so no toolkit call ever happens off the main thread."""

    def __init__(self, model, tokenizer, model_name: str, **options):
        self.model_name = model_name
        self.thinking_enabled = True
        self._session = ChatSession(model, tokenizer, **options)
        self._lock = threading.Lock()
        self._cancel: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None
        self._state = {"thinking": "", "answer": "", "status": "ready", "busy": False}

    def snapshot(self) -> dict:
        with self._lock:
            return {**self._state, "model": self.model_name, "thinking_enabled": self.thinking_enabled}

    def _set(self, **changes):
        with self._lock:
            self._state.update(changes)

    def ask(self, prompt: str) -> bool:
        """Start answering `prompt`; False (and a status saying why) when it cannot start."""
        if self._state["busy"]:
            self._set(status="still answering: stop it first")
            return False
        if not prompt or not prompt.strip():
            self._set(status="type a question first")
            return False
        self._cancel = threading.Event()
        self._set(thinking="", answer="", status="thinking…" if self.thinking_enabled else "answering…", busy=True)
        self._thread = threading.Thread(target=self._answer, args=(prompt, self._cancel), daemon=True)
        self._thread.start()
        return True

    def _answer(self, prompt: str, cancel: threading.Event):
        try:
            for event in self._session.stream(prompt, enable_thinking=self.thinking_enabled, cancel=cancel):
                with self._lock:
                    if event.type == "thinking":
                        self._state["thinking"] += event.text
                    elif event.type == "answer":
                        self._state["answer"] += event.text
                        self._state["status"] = "answering…"
                    elif event.type == "tool_call":
                        self._state["answer"] += f"\n[tool call] {event.text}"
                    elif event.type == "done":
                        self._state["status"] = {"stop": "done", "length": "stopped at the token limit",
                                                 "cancelled": "stopped"}[event.finish_reason]
                        self._state["status"] += f" · {event.generation_tps:.1f} tok/s"
        except UserError as e:
            self._set(status=f"error: {e}")
        finally:
            self._set(busy=False)

    def stop(self):
        if self._cancel is not None:
            self._cancel.set()

    def wait(self, timeout: Optional[float] = None):
        if self._thread is not None:
            self._thread.join(timeout)

    def toggle_thinking(self) -> bool:
        self.thinking_enabled = not self.thinking_enabled
        return self.thinking_enabled

    def new_chat(self):
        self.stop()
        self.wait()
        self._session.reset()
        self._set(thinking="", answer="", status="ready")


def _wrap(text: str, width: int = 60, lines: int = 12) -> list:
    import textwrap

    out = [piece for para in text.splitlines() for piece in (textwrap.wrap(para, width) or [""])]
    return out[-lines:]


class MenubarApp:
    """The rumps layer: menu items that call the controller, and a timer that shows its state."""

    def __init__(self, rumps, controller: AssistantController):
        self.rumps, self.c = rumps, controller
        self.app = rumps.App("Qwen", title="Q")
        self.model_item = rumps.MenuItem(f"Model: {controller.model_name}")
        self.status_item = rumps.MenuItem("ready")
        self.think_item = rumps.MenuItem("Thinking", callback=self.toggle)
        self.think_item.state = 1
        self.reply = rumps.MenuItem("Reply")
        self.app.menu = [
            rumps.MenuItem("Ask…", callback=self.ask, key="k"),
            rumps.MenuItem("Stop", callback=lambda _: self.c.stop()),
            rumps.MenuItem("New chat", callback=lambda _: self.c.new_chat()),
            self.think_item, None, self.model_item, self.status_item, self.reply,
        ]
        self.timer = rumps.Timer(self.refresh, 0.2)
        self._shown = None

    def ask(self, _):
        window = self.rumps.Window("Ask Qwen", "mlx-qwen3", default_text="", ok="Ask", cancel="Cancel",
                                   dimensions=(420, 120))
        response = window.run()
        if response.clicked:
            self.c.ask(response.text)

    def toggle(self, item):
        item.state = int(self.c.toggle_thinking())

    def refresh(self, _):
        s = self.c.snapshot()
        key = (s["thinking"], s["answer"], s["status"], s["busy"])
        if key == self._shown:
            return
        self._shown = key
        self.app.title = "Q…" if s["busy"] else "Q"
        self.status_item.title = s["status"]
        self.reply.clear()
        if s["thinking"]:
            for line in _wrap(s["thinking"], lines=6):
                self.reply.add(self.rumps.MenuItem(f"  {line}"))  # indented: the thought
            self.reply.add(None)
        for line in _wrap(s["answer"]):
            self.reply.add(self.rumps.MenuItem(line, callback=self.copy))
        self.reply.title = (s["answer"][:40] + "…") if len(s["answer"]) > 40 else (s["answer"] or "Reply")

    def copy(self, _):
        import subprocess

        subprocess.run(["pbcopy"], input=self.c.snapshot()["answer"].encode(), check=False)

    def run(self):
        self.timer.start()
        self.app.run()


if __name__ == "__main__":  # python -m mlx_qwen3.menubar is `mlx-qwen3 menubar`
    from .cli import main
    main("menubar")
