"""The CLIP vocabulary rebuilt from open_clip's BPE file is OpenAI's: size, specials, known ids."""

import json

from sdrt.export.clip_vocab import build_vocab, find_bpe_file, read_merges


def test_vocab_has_clip_size_and_special_tokens():
    vocab = build_vocab(read_merges(find_bpe_file()))
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256


def test_tiny_model_tokenizer_gives_published_clip_ids(tiny_model):
    from transformers import CLIPTokenizer

    # Ids of OpenAI's CLIP tokenizer for this sentence, as published with every SD pipeline.
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    merges = (tiny_model / "tokenizer" / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    assert len(json.loads((tiny_model / "tokenizer" / "vocab.json").read_text())) == 49408
