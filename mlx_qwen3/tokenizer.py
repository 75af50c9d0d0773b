"""The Qwen tokenizer: `tokenizers` byte-level BPE plus what tokenizer_config.json says about it."""

import json
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer as _HFTokenizer

from .errors import UserError


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict, chat_template: Optional[str]):
        self._tok = tokenizer
        self.config = config
        self.chat_template = chat_template

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
        cfg_file = folder / "tokenizer_config.json"
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        return cls(tok, config, template)

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

    @property
    def eos_token_ids(self) -> set:
        eos = self.config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        ids = {self.token_id(t) for t in (eos, "<|im_end|>", "<|endoftext|>") if t}
        return {i for i in ids if i is not None}
