"""Content hashes: the runtime trusts only files whose sha256 matches the manifest."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class VerifiedFiles:
    """Which files were hashed already, keyed by what would change if they were modified.

    Hashing SD 1.5's 4 GB of graphs takes seconds, on every load. A file whose device, inode, size
    and modification time (in nanoseconds) are what they were when its sha256 last matched is
    the same file, so its hash is not recomputed; any write, copy or replacement changes one of
    them and the file is hashed again. The record lives in ``path`` (written atomically); where it
    cannot be written (a read-only volume) every load hashes everything, as before.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict[str, list] = {}
        self._dirty = False
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and data.get("schema_version") == 1:
                self._entries = dict(data.get("files", {}))
        except (OSError, ValueError):
            pass

    @staticmethod
    def _stamp(path: Path) -> list:
        st = path.stat()
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]

    def sha256(self, path: Path) -> str:
        """The file's sha256: remembered when its stamp is unchanged since it was hashed, else computed."""
        stamp, key = self._stamp(path), str(Path(path).resolve())
        entry = self._entries.get(key)
        if entry and entry[0] == stamp:
            return entry[1]
        digest = sha256_file(path)
        self._entries[key] = [stamp, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"schema_version": 1, "files": self._entries}))
            tmp.replace(self.path)
            self._dirty = False
        except OSError:  # read-only artifacts: hashing again next time is the only cost
            pass
