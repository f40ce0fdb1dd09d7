"""Turn OpenAI's CLIP BPE file into the standard ``vocab.json`` + ``merges.txt`` pair.

``open_clip_torch`` ships the original ``bpe_simple_vocab_16e6.txt.gz``. We only read that
one data file (located through package metadata, never by importing ``open_clip``, whose
dependencies pull torchvision and timm), and rebuild the vocabulary exactly as CLIP's
``SimpleTokenizer`` does: 256 byte tokens, their ``</w>`` forms, one token per merge, then
the two special tokens. The result is the 49,408-entry vocabulary every SD 1.x/2.x folder ships.
"""

from __future__ import annotations

import gzip
import json
from importlib import metadata
from pathlib import Path

from sdrt.runtime.errors import SdrtError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file.
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table (CLIP uses the same)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def find_bpe_file() -> Path:
    """Locate the BPE file inside an installed ``open_clip_torch`` distribution."""
    try:
        files = metadata.files("open_clip_torch") or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == BPE_FILE:
            return Path(f.locate())
    raise SdrtError(
        f"CLIP vocabulary: expected {BPE_FILE} from the open_clip_torch package, found none "
        "(install the data file only: pip install --no-deps open_clip_torch)"
    )


def read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise SdrtError(f"CLIP vocabulary: expected {NUM_MERGES} merge pairs in {bpe_path}, got a malformed file")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_clip_tokenizer_files(out_dir: Path, bpe_path: Path | None = None) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the SD 1.x tokenizer config into ``out_dir``."""
    merges = read_merges(bpe_path or find_bpe_file())
    vocab = build_vocab(merges)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out_dir
