"""The runtime tokenizer gives exactly transformers' CLIPTokenizer ids (padding and truncation to 77)."""

import shutil

import numpy as np
import pytest

from sdrt.runtime.tokenizer import ClipTokenizer

PROMPTS = [
    "",
    " ",
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT Riding A Horse",
    "hello, world!!! ... ??? (((masterpiece))), [best quality]",
    "it's a cat's toy; they'll've done it",
    "numbers 1234567890 and 3.14159 and 1e-5",
    "café naïve résumé façade",
    "日本語のプロンプト、東京の夜景",
    "emoji 🚀🔥 test 👩‍🚀",
    "Ünïcödé ß ẞ ﬁ ligature",
    "tabs\tand\nnewlines\r\n  multiple   spaces",
    "<|startoftext|> special tokens in text <|endoftext|>",
    "hyphenated-words and under_scores and slashes/paths",
    "$100 & 50% off @home #hashtag",
    "a " * 100,
    "portrait of a woman, " * 30,
    " ".join(f"word{i}" for i in range(200)),
    "x" * 500,
    "Ελληνικά και русский текст",
    "mixed CASE with Numbers123 and sym_bols!",
    "\u00a0non-breaking\u2009thin space\u200bzero width",
]


@pytest.fixture(scope="module")
def reference(tiny_model):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")


def reference_ids(tokenizer, prompts):
    out = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    return out.input_ids.astype(np.int64)


def test_ids_match_transformers(tiny_artifacts, reference):
    ours = ClipTokenizer(tiny_artifacts / "tokenizer" / "tokenizer.json", 77, reference.pad_token_id)
    got, want = ours(PROMPTS), reference_ids(reference, PROMPTS)
    assert got.shape == (len(PROMPTS), 77)
    for prompt, g, w in zip(PROMPTS, got, want):
        assert g.tolist() == w.tolist(), prompt
    # the over-length prompts were really truncated, keeping the end token (49407 also pads, so a truncated
    # row is one whose last two ids are not both 49407)
    truncated = got[:, -2] != 49407
    assert truncated.sum() >= 4 and (got[truncated, -1] == 49407).all()


def test_tokenizer_json_only_layout_exports_the_same_ids(tiny_model, tmp_path, reference):
    """transformers 5 saves tokenizer.json only; export accepts that layout as well."""
    from transformers import CLIPTokenizer

    from sdrt.export.build import _write_tokenizer
    from sdrt.export.modules import load_pipeline

    src = tmp_path / "model"
    shutil.copytree(tiny_model, src)
    CLIPTokenizer.from_pretrained(tiny_model / "tokenizer").save_pretrained(tmp_path / "v5tok")
    shutil.rmtree(src / "tokenizer")
    shutil.copytree(tmp_path / "v5tok", src / "tokenizer")
    assert not (src / "tokenizer" / "vocab.json").exists()
    # v5 drops model_max_length; the text length then comes from the text encoder (77)
    out = tmp_path / "out"
    out.mkdir()
    info = _write_tokenizer(load_pipeline(src), "tokenizer", out)
    ours = ClipTokenizer(out / "tokenizer" / "tokenizer.json", info.max_length, info.pad_token_id)
    assert info.max_length == 77
    np.testing.assert_array_equal(ours(PROMPTS), reference_ids(reference, PROMPTS))


def test_classic_vocab_and_merges_layout_without_transformers(tiny_model, reference):
    """Foreign ONNX folders (optimum's) ship vocab.json + merges.txt: the runtime builds CLIP's BPE itself."""
    assert not (tiny_model / "tokenizer" / "tokenizer.json").exists()
    ours = ClipTokenizer.from_tokenizer_dir(tiny_model / "tokenizer", 77)
    assert ours.pad_token_id == reference.pad_token_id
    np.testing.assert_array_equal(ours(PROMPTS), reference_ids(reference, PROMPTS))


def test_missing_tokenizer_files_are_named(tmp_path):
    from sdrt.runtime import ArtifactError

    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"expected tokenizer.json, or vocab.json and merges.txt.*\['vocab.json'\]"):
        ClipTokenizer.from_tokenizer_dir(tmp_path / "tokenizer", 77)
