"""The Qwen tokenizer: `tokenizers` byte-level BPE, the model's chat template, a streaming detokenizer."""

import codecs
import json
import logging
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Optional

from jinja2 import TemplateError
from tokenizers import Tokenizer as _HFTokenizer

from .errors import UserError

log = logging.getLogger(__name__)

# Used, with a warning, when a model ships no template of its own.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict, chat_template: Optional[str],
                 generation_config: Optional[dict] = None):
        self._tok = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.generation_config = generation_config or {}
        self._special_bytes = {i: t.content.encode() for i, t in tokenizer.get_added_tokens_decoder().items()}

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        folder = Path(folder)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"{folder} has no tokenizer.json; copy the tokenizer files from the original model")
        try:
            tok = _HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on a corrupt file
            raise UserError(f"{file} cannot be read ({str(e).splitlines()[0]}); download it again") from None
        config = _read_json(folder / "tokenizer_config.json")
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        return cls(tok, config, template, _read_json(folder / "generation_config.json"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> Optional[int]:
        """The id of a token in the vocabulary (special tokens included), or None."""
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token: int) -> bytes:
        """The exact bytes a token stands for (a piece of a UTF-8 character, possibly)."""
        special = self._special_bytes.get(token)
        if special is not None:
            return special
        piece = self._tok.id_to_token(token)
        return bytes(_UNICODE_TO_BYTE[c] for c in piece) if piece is not None else b""

    @property
    def eos_token_ids(self) -> set:
        """The tokens that end a reply: generation_config.json's eos_token_id and the tokenizer's eos."""
        ids = self.generation_config.get("eos_token_id", [])
        ids = set(ids if isinstance(ids, list) else [ids])
        eos = self.config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        for t in (eos, "<|im_end|>"):
            if t and self.token_id(t) is not None:
                ids.add(self.token_id(t))
        return ids

    def apply_chat_template(self, messages: list, tools=None, add_generation_prompt=True, **kwargs) -> str:
        """Render the model's own Jinja template the way transformers does."""
        template = self.chat_template
        if template is None:
            log.warning("the model ships no chat template; using plain ChatML")
            template = CHATML_TEMPLATE
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            return _compile(template).render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                bos_token=self.config.get("bos_token") or "", eos_token=self.config.get("eos_token") or "",
                **kwargs,
            )
        except (_TemplateError, TemplateError) as e:
            raise UserError(f"the chat template refused the conversation: {e}") from None


class StreamingDetokenizer:
    """Token ids in, text out; a character split across tokens comes out whole, once."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._decoder.decode(self._tokenizer.token_bytes(token))

    def flush(self) -> str:
        """What is left (an incomplete character becomes U+FFFD, as tokenizers' decode does)."""
        return self._decoder.decode(b"", final=True)


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON ({e}); download it again") from None


def _bytes_to_unicode() -> dict:
    """GPT-2's byte-level alphabet: each byte is shown as one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class _TemplateError(Exception):
    pass


def _raise(message):
    raise _TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
