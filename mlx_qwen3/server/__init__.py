"""An OpenAI-compatible local server on top of the generator: /v1/models, /v1/chat/completions
(server-sent events or one JSON), /health, and a chat page at /.

One model, one worker thread: up to 16 requests (--parallel) decode together, one forward pass for all of
them per token (and, with drafts, several tokens per pass), the rest wait in a queue; each starts from the cached prompt that shares the longest prefix with it. The
cached prompts are bounded in number and in bytes (a 32k-token QwQ-32B prompt holds 8.6 GB).

Under bad input and faults: whatever a request holds, the answer is a 2xx or a 4xx with OpenAI's error
JSON, decided before a stream starts; a client that leaves cancels its generation; the first SIGINT or
SIGTERM cancels every generation, answers every client and exits 0; only this machine's addresses
(Host) and pages (Origin) may drive it, unless --allow-origin says otherwise.
"""

from .app import create_app
from .follow import follow
from .serve import api_key_from, make_server

__all__ = ["create_app", "make_server", "api_key_from", "follow"]
