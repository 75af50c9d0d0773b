import socket
import threading
import time
from contextlib import contextmanager

import pytest
from chain import build as build_scripted
from chain import endless, ids_of, successors, tokenizer
from checkpoints import build

from mlx_qwen3 import load

NAME = "qwen3-tiny"  # what the test servers call their model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> (folder, transformers model); each built once per session."""
    made = {}

    def get(name):
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            made[name] = (folder, build(name, folder))
        return made[name]

    return get


# ---- scripted models (tests/chain.py) shared by the server, chat page and menubar tests ----

def _tail(tok, **kwargs):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": "x"}], **kwargs))[-1]


@pytest.fixture(scope="session")
def answering(tmp_path_factory):
    """Thinks "Let me think", answers "The answer is 4."; without thinking answers "Hi there."."""
    tok = tokenizer()
    think = [_tail(tok)] + ids_of(tok, ["<think>", "Let me think", "</think>", "The answer is 4.", "<|im_end|>"])
    plain = [_tail(tok, enable_thinking=False)] + ids_of(tok, ["Hi there!", "<|im_end|>"])
    return load(build_scripted(tmp_path_factory.mktemp("answering"), successors(think, plain), max_position_embeddings=256))


@pytest.fixture(scope="session")
def thinking_dir(tmp_path_factory):
    """A model folder that thinks "Let me think", then answers "The answer is 4." after a blank line."""
    tok = tokenizer()
    reply = ids_of(tok, ["<think>", "Let me think", "</think>", "\n\n", "The answer is 4.", "<|im_end|>"])
    return build_scripted(tmp_path_factory.mktemp("thinking"), successors([_tail(tok)] + reply),
                          max_position_embeddings=512)


@pytest.fixture(scope="module")
def server(answering):
    with serving(*answering) as url:
        yield url


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory):
    tok = tokenizer()
    script = [_tail(tok)] + ids_of(tok, ["<think>", "Plan", "</think>", "<tool_call>", '{"name":"f","arguments":{}}',
                                         "</tool_call>", "<|im_end|>"])
    return load(build_scripted(tmp_path_factory.mktemp("tools"), successors(script)))


@pytest.fixture(scope="session")
def looping_dir(tmp_path_factory):
    """A model folder that answers "a ba b..." without end (max_tokens or a disconnect stop it)."""
    tok = tokenizer()
    script = [_tail(tok, enable_thinking=False)] + endless(tok)
    return build_scripted(tmp_path_factory.mktemp("loop"), successors(script), max_position_embeddings=100000)


@pytest.fixture(scope="session")
def looping(looping_dir):
    return load(looping_dir)



def free_ports(n: int) -> int:
    """The first of `n` consecutive free ports (the ring backend takes one per rank from --starting-port)."""
    import random
    from contextlib import ExitStack

    while True:
        first = random.randrange(20000, 60000)
        with ExitStack() as held:
            try:
                for port in range(first, first + n):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
                return first
            except OSError:
                continue


def wait_for_health(url: str, alive, why, timeout: float):
    """Until `url`/health answers; fails with why() when alive() turns false or `timeout` passes."""
    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            httpx.get(f"{url}/health", timeout=1)
            return
        except httpx.HTTPError:
            assert alive() and time.time() < deadline, why()
            time.sleep(0.1)


@pytest.fixture(scope="session")
def serve():
    """serve(model, tokenizer, **create_app options): a context manager giving a live server's URL."""
    return serving


@contextmanager
def serving(model, tok, **options):
    """A live server in a thread, as `python -m mlx_qwen3.server` runs it (make_server)."""
    from mlx_qwen3.server import create_app, make_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = make_server(create_app(model, tok, NAME, **options), "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


