"""The Qwen tokenizer: `tokenizers` byte-level BPE, the model's chat template, a streaming detokenizer."""

import codecs
import json
import logging
import math
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Optional

from jinja2 import TemplateError
from tokenizers import Tokenizer as _HFTokenizer

from .checkpoint import read_json
from .errors import UserError, show

log = logging.getLogger(__name__)

# Used, with a warning, when a model ships no template of its own.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict, chat_template=None,
                 generation_config: Optional[dict] = None):
        """`chat_template`: one template, Hugging Face's list of named ones ([{"name", "template"}, ...]),
        or a dict name -> template; a model with several has a "default" (and may have "tool_use")."""
        self._tok = tokenizer
        self.config = config
        self.chat_templates = _named_templates(chat_template)
        self.chat_template = self.chat_templates.get("default")  # what a conversation without tools gets
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
            raise UserError(f"{file} cannot be read ({_first_line(e)}); download it again") from None
        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file)
        for key in ("bos_token", "eos_token"):
            if _token_text(config.get(key)) is False:
                raise UserError(f"{config_file}: {key} must be a string or an object with a string content, "
                                f"not {show(config.get(key))}")
        files = _template_files(folder)
        where = f"{folder}'s chat template files" if files else f"{config_file}: chat_template"
        templates = _named_templates(files or config.get("chat_template"), where)
        made = cls(tok, config, templates, _generation_config(folder / "generation_config.json"))
        for name, template in made.chat_templates.items():  # syntax errors now, not at the first request
            try:
                _compile(template)
            except Exception as e:  # TemplateSyntaxError; RecursionError from absurd nesting
                line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
                raise UserError(
                    f"{folder}: the chat template {name!r} does not compile: {_first_line(e)}{line}"
                ) from None
        return made

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def max_id(self) -> int:
        """The highest token id the tokenizer can produce."""
        n = self._tok.get_vocab_size(with_added_tokens=True)
        top = max([n - 1, *self._special_bytes])
        if top < 0:
            return -1
        if self._tok.id_to_token(top) is None or self._tok.id_to_token(top + 1) is not None:
            # The ids have gaps (every real vocabulary is dense): find the largest the slow way.
            top = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)
        return top

    def vocabulary(self) -> dict:
        """token -> id, special tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    def token_id(self, token: str) -> Optional[int]:
        """The id of a token in the vocabulary (special tokens included), or None."""
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list:
        # encode_batch_fast lets go of the GIL while it works (encode holds it: a 3.9 MB prompt stalled every
        # other thread, a server's event loop included, for seconds) and skips the character offsets.
        return self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids

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
        for t in (_token_text(self.config.get("eos_token")), "<|im_end|>"):
            if t and self.token_id(t) is not None:
                ids.add(self.token_id(t))
        return ids

    def apply_chat_template(self, messages: list, tools=None, add_generation_prompt=True, **kwargs) -> str:
        """Render the model's own Jinja template the way transformers does (with several named
        templates, "tool_use" when tools are given and it exists, else "default")."""
        template = self.chat_templates.get("tool_use") if tools is not None else None
        template = template or self.chat_template
        if template is None:
            log.warning("the model ships no chat template; using plain ChatML")
            template = CHATML_TEMPLATE
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            text = _compile(template).render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                bos_token=_token_text(self.config.get("bos_token")) or "",
                eos_token=_token_text(self.config.get("eos_token")) or "",
                **kwargs,
            )
        except (_TemplateError, TemplateError) as e:
            raise UserError(f"the chat template refused the conversation: {_first_line(e)}") from None
        except Exception as e:  # a template's own bug, hit by this conversation: TypeError, KeyError, ...
            raise UserError(
                f"the chat template failed on this conversation ({type(e).__name__}: {_first_line(e)})"
            ) from None
        if not text:  # there would be no token to start from
            raise UserError("the chat template rendered nothing for this conversation; the model's template is broken")
        return text


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _token_text(token):
    """A special token as tokenizer_config.json writes it (a string, or an AddedToken object with
    its content) -> its text; None when absent; False when it is neither."""
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    return False


def _named_templates(chat_template, where: str = "chat_template") -> dict:
    """A chat template in any form Hugging Face writes -> {name: template}; {} for none."""
    if chat_template is None:
        return {}
    if isinstance(chat_template, str):
        return {"default": chat_template}
    if isinstance(chat_template, list):  # tokenizer_config.json's [{"name": ..., "template": ...}, ...]
        named = {}
        for entry in chat_template:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise UserError(f"{where} lists {show(entry)}, not an object with a string name and template")
            named[entry["name"]] = entry["template"]
        chat_template = named
    if not isinstance(chat_template, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in chat_template.items()
    ):
        raise UserError(f"{where} must be a string or a list of named templates, not {show(chat_template)}")
    if chat_template and "default" not in chat_template:
        raise UserError(f"{where} names templates ({', '.join(sorted(chat_template))}) but no \"default\" one "
                        "for conversations without tools")
    return dict(chat_template)


def _template_files(folder: Path) -> dict:
    """chat_template.jinja ("default") and additional_chat_templates/NAME.jinja, as transformers 5 saves
    them; when present they take the place of tokenizer_config.json's chat_template."""
    files = {}
    if (folder / "chat_template.jinja").is_file():
        files["default"] = folder / "chat_template.jinja"
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            if f.is_file():
                files[f.name.removesuffix(".jinja")] = f
    named = {}
    for name, f in files.items():
        try:
            named[name] = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{f} is not UTF-8 text") from None
        except OSError as e:
            raise UserError(f"{f} cannot be read ({e.strerror or e})") from None
    return named


# generation_config.json keys that generation uses, with what each must be.
_NUMBER = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
_INTEGER = lambda v: isinstance(v, int) and not isinstance(v, bool)
_GENERATION_CHECKS = {
    "temperature": (lambda v: _NUMBER(v) and v >= 0, "a finite number >= 0"),
    "top_p": (lambda v: _NUMBER(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _INTEGER(v) and v >= 0, "an integer >= 0 (0: off)"),
    "min_p": (lambda v: _NUMBER(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "eos_token_id": (
        lambda v: (_INTEGER(v) and v >= 0) or (isinstance(v, list) and all(_INTEGER(i) and i >= 0 for i in v)),
        "a token id or a list of token ids",
    ),
}


def _generation_config(file: Path) -> dict:
    config = _read_json(file)
    for key, (ok, what) in _GENERATION_CHECKS.items():
        if config.get(key) is not None and not ok(config[key]):
            raise UserError(f"{file}: {key} must be {what}, not {show(config[key])}")
    return config


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
    return read_json(file) if file.exists() else {}


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
