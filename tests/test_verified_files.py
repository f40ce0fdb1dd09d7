"""Hashes are remembered per file stamp: unchanged files are not hashed again, any change is."""

import os

from sdrt.runtime import hashing
from sdrt.runtime.hashing import VerifiedFiles, sha256_file


def test_unchanged_files_are_not_hashed_again_and_changed_ones_are(tmp_path, monkeypatch):
    data = tmp_path / "unet.onnx.data"
    data.write_bytes(b"weights" * 1000)
    record = tmp_path / "engines" / "verified.json"
    calls = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: calls.append(p) or real(p))

    first = VerifiedFiles(record)
    old = first.sha256(data)
    assert old == sha256_file(data)
    first.save()
    assert record.is_file() and len(calls) == 1

    again = VerifiedFiles(record)  # a new process: read back from disk
    assert again.sha256(data) == sha256_file(data) and len(calls) == 1

    # Same size, new content: the modification time moves, so the file is hashed again.
    st = data.stat()
    data.write_bytes(b"WEIGHTS" * 1000)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    changed = VerifiedFiles(record)
    assert changed.sha256(data) == sha256_file(data) != old
    assert len(calls) == 2


def test_unwritable_record_only_costs_hashing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    data = tmp_path / "x"
    data.write_bytes(b"x")
    verified = VerifiedFiles(blocker / "verified.json")
    assert verified.sha256(data) == sha256_file(data)
    verified.save()  # cannot be written under a file: silently skipped
    assert not (blocker / "verified.json").exists()
