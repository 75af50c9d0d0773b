"""The menubar assistant's controller, driven on Linux without rumps; and a fake rumps for its layer."""

import time

import pytest

from mlx_qwen3.menubar import AssistantController, MenubarApp


def settled(c, timeout=30):
    c.wait(timeout)
    return c.snapshot()


def test_ask_streams_thinking_and_answer(answering):
    c = AssistantController(*answering, "qwen3-tiny", temperature=0)
    assert c.snapshot()["model"] == "qwen3-tiny" and c.snapshot()["status"] == "ready"
    assert c.ask("What is 2+2?")
    s = settled(c)
    assert (s["thinking"], s["answer"], s["busy"]) == ("Let me think", "The answer is 4.", False)
    assert s["status"].startswith("done")


def test_thinking_toggle(answering):
    c = AssistantController(*answering, "m", temperature=0)
    assert c.toggle_thinking() is False and c.snapshot()["thinking_enabled"] is False
    c.ask("Hello")
    s = settled(c)
    assert (s["thinking"], s["answer"]) == ("", "Hi there!")


def test_stop_button_and_busy_guard(looping):
    c = AssistantController(*looping, "m", temperature=0, enable_thinking=False)
    c.thinking_enabled = False
    assert c.ask("go")
    while not c.snapshot()["answer"]:
        time.sleep(0.01)
    assert c.ask("again") is False and "stop it first" in c.snapshot()["status"]
    c.stop()
    s = settled(c)
    assert s["status"].startswith("stopped") and s["answer"].startswith("a b") and not s["busy"]


def test_empty_prompt_and_new_chat(answering):
    c = AssistantController(*answering, "m", temperature=0)
    assert c.ask("   ") is False and c.snapshot()["status"] == "type a question first"
    c.ask("What is 2+2?")
    settled(c)
    c.new_chat()
    assert c.snapshot()["answer"] == "" and c._session.messages == []


class FakeRumps:
    """Just enough of rumps' surface to build the menu and refresh it."""

    class MenuItem:
        def __init__(self, title, callback=None, key=None):
            self.title, self.callback, self.state, self.items = title, callback, 0, []

        def clear(self):
            self.items = []

        def add(self, item):
            self.items.append(item)

    class App:
        def __init__(self, name, title=None):
            self.title, self.menu = title, []

    class Timer:
        def __init__(self, fn, interval):
            self.fn = fn


def test_the_rumps_layer_shows_the_controller(answering):
    c = AssistantController(*answering, "qwen3-tiny", temperature=0)
    app = MenubarApp(FakeRumps, c)
    assert app.model_item.title == "Model: qwen3-tiny"
    c.ask("What is 2+2?")
    settled(c)
    app.refresh(None)
    titles = [i.title if i else None for i in app.reply.items]
    assert "  Let me think" in titles and "The answer is 4." in titles and app.app.title == "Q"
    app.toggle(app.think_item)
    assert app.think_item.state == 0 and c.thinking_enabled is False


def test_the_cli_off_macos_is_one_clear_line():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mlx_qwen3.menubar", "--model", "x"], capture_output=True, text=True)
    if sys.platform == "darwin":
        pytest.skip("on macOS the menubar app would start")
    assert out.returncode == 2 and out.stderr == (
        "error: the menubar assistant runs on macOS; use python -m mlx_qwen3.server elsewhere\n")
