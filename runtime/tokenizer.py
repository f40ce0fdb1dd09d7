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

    @classmethod
    def from_tokenizer_dir(cls, directory: Path, max_length: int, pad_token_id: int | None = None) -> ClipTokenizer:
        """A tokenizer folder in either layout: ``tokenizer.json``, or the classic ``vocab.json`` +
        ``merges.txt`` of SD 1.x/2.x folders (built here as transformers' CLIP converter does)."""
        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            tokenizer = cls(directory / "tokenizer.json", max_length, pad_token_id if pad_token_id is not None else 0)
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            tokenizer = cls.__new__(cls)
            tokenizer._tok = _clip_bpe(directory / "vocab.json", directory / "merges.txt")
            tokenizer.max_length = max_length
        else:
            raise ArtifactError(
                f"tokenizer: expected tokenizer.json, or vocab.json and merges.txt, in {directory}; found "
                f"{sorted(p.name for p in directory.iterdir()) if directory.is_dir() else 'no such folder'}"
            )
        if pad_token_id is None:
            pad_token_id = _pad_token_id(directory, tokenizer._tok)
        tokenizer.pad_token_id = pad_token_id
        tokenizer._tok.enable_truncation(max_length=max_length)
        tokenizer._tok.enable_padding(
            length=max_length, pad_id=pad_token_id, pad_token=tokenizer._tok.id_to_token(pad_token_id)
        )
        return tokenizer

    def __call__(self, prompts: list[str]) -> np.ndarray:
        encodings = self._tok.encode_batch(list(prompts))
        return np.asarray([e.ids for e in encodings], dtype=np.int64).reshape(len(prompts), self.max_length)

    def dropped(self, prompts: list[str]) -> list[str]:
        """Per prompt, the text truncation cuts off beyond ``max_length`` tokens ("" when it fits), as diffusers
        logs it ("The following part of your input was truncated ...")."""
        cut = []
        for e in self._tok.encode_batch(list(prompts)):
            ids = [i for o in e.overflowing for i, m in zip(o.ids, o.attention_mask) if m]
            text = self._tok.decode(ids, skip_special_tokens=True) if ids else ""
            cut.append(" ".join(text.replace("</w>", " ").split()))  # CLIP's BPE marks word ends with </w>
        return cut


BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _clip_bpe(vocab: Path, merges: Path):
    """CLIP's byte-level BPE from vocab.json + merges.txt, with the normalizer, pre-tokenizer and
    post-processor of transformers' ``CLIPConverter`` (which its tests hold equal to ``CLIPTokenizer``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    model = BPE.from_file(
        str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    for special in (BOS, EOS):
        if tok.token_to_id(special) is None:
            raise ArtifactError(f"tokenizer: expected {special!r} in {vocab}, found no such token")
    # As transformers registers them: matched verbatim in the prompt text, before normalization.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (BOS, EOS)])
    tok.post_processor = processors.RobertaProcessing(
        (EOS, tok.token_to_id(EOS)), (BOS, tok.token_to_id(BOS)), trim_offsets=False, add_prefix_space=False
    )
    return tok


def _pad_token_id(directory: Path, tok) -> int:
    """The pad token from tokenizer_config.json (SD 1.x pads with <|endoftext|>, SD 2.x with '!')."""
    import json

    pad = EOS
    config = directory / "tokenizer_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("pad_token", EOS)
        pad = value.get("content", EOS) if isinstance(value, dict) else (value or EOS)
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise ArtifactError(f"tokenizer: expected the pad token {pad!r} in the vocabulary of {directory}, found none")
    return pad_id
