"""CLIP tokenization with the ``tokenizers`` library: ids padded/truncated to the model's text length."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdrt.runtime.errors import ArtifactError


class ClipTokenizer:
    """Turns prompts into ``(batch, max_length)`` int64 ids exactly as ``transformers.CLIPTokenizer``
    does with ``padding="max_length", truncation=True``."""

    def __init__(self, tokenizer_json: Path, max_length: int, pad_token_id: int):
        from tokenizers import Tokenizer

        if not Path(tokenizer_json).is_file():
            raise ArtifactError(f"tokenizer: expected {tokenizer_json}, found no such file (re-run `sdrt export`)")
        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self._tok.enable_truncation(max_length=max_length)
        pad_token = self._tok.id_to_token(pad_token_id)
        self._tok.enable_padding(length=max_length, pad_id=pad_token_id, pad_token=pad_token)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        encodings = self._tok.encode_batch(list(prompts))
        return np.asarray([e.ids for e in encodings], dtype=np.int64).reshape(len(prompts), self.max_length)
