"""A small T5 tokenizer built locally, for the random-weight SD 3 models (no download).

SD 3's ``tokenizer_3`` is T5's SentencePiece Unigram model (32,100 pieces). This builds one of the same
kind with the ``tokenizers`` library: a Unigram model over the characters of printable ASCII and the
words of a fixed English corpus (the benchmark's and calibration's prompts among them), each piece
scored by its log-frequency, with T5's special tokens (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), its
Metaspace pre-tokenizer ("▁" before every word) and its ``$A </s>`` post-processor. It is saved as
``T5TokenizerFast`` (``tokenizer.json`` + ``tokenizer_config.json``), which is what diffusers' SD 3
pipelines and sdrt's runtime read. Deterministic: no training, the same files every time.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from pathlib import Path

SPECIAL = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2
SPACE = "\u2581"  # SentencePiece's word-boundary marker
MODEL_MAX_LENGTH = 512
CORPUS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dusk",
    "portrait of an old fisherman, dramatic lighting, 85mm",
    "a bowl of ramen on a wooden table, food photography",
    "isometric pixel art of a tiny medieval village",
    "a snowy mountain lake at sunrise, wide angle",
    "a red sports car on a wet city street at night, neon reflections",
    "a macro photo of a honeybee on a sunflower",
    "an oil painting of a stormy sea in the style of Turner",
    "a cozy library with leather armchairs and a fireplace",
    "a cyberpunk samurai, concept art, highly detailed",
    "a golden retriever puppy playing in autumn leaves",
    "a cat sleeping on a windowsill in the afternoon sun",
    "the interior of a gothic cathedral, light through stained glass",
    "a bustling market street, people, colors, the sky is blue and the clouds are white",
    "a dog, a cat, a bird, a tree, a house, a river, a city, a forest, a beach, a castle",
)


def pieces() -> list[tuple[str, float]]:
    """(piece, log-probability score) of the vocabulary, special tokens first."""
    words = Counter(w for line in CORPUS for w in line.lower().replace(",", " ,").split())
    chars = Counter(c for line in CORPUS for c in line)
    total = sum(words.values()) + sum(chars.values())
    vocab: dict[str, float] = {}
    for word, count in sorted(words.items()):
        vocab[SPACE + word] = math.log(count / total)
    for c in string.printable.strip() + " ":
        if c.isspace():
            continue
        score = math.log((chars.get(c, 0) + 1) / total) - 2.0  # characters cost more than whole words
        vocab.setdefault(c, score)
        vocab.setdefault(SPACE + c, score - 0.5)
    vocab.setdefault(SPACE, math.log(1 / total) - 3.0)
    return [(s, 0.0) for s in SPECIAL] + sorted(vocab.items())


def build_tokenizer():
    """The ``tokenizers.Tokenizer``: Unigram model, NFKC normalizer, Metaspace, ``$A </s>``."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    tok = Tokenizer(Unigram(pieces(), unk_id=SPECIAL.index("<unk>"), byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(r" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always")
    eos = SPECIAL.index("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])  # fmt: skip
    return tok


def write_t5_tokenizer(out_dir: Path) -> Path:
    """Save the tokenizer as ``T5TokenizerFast`` into ``out_dir`` (``tokenizer.json``, ``tokenizer_config.json``)."""
    from transformers import T5TokenizerFast

    fast = T5TokenizerFast(tokenizer_object=build_tokenizer(), eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", extra_ids=0, model_max_length=MODEL_MAX_LENGTH)  # fmt: skip
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)
