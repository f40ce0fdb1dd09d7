"""Make tensorrt-stubs (TensorRT 10.13's API signatures, from PyPI) readable by mypy.

The stubs are generated from the bindings and have a few signatures Python cannot parse (a
parameter without a default after defaulted ones; parameters named after keywords). Each such
signature is replaced by a permissive one (``*args, **kwargs``) with its return type kept, so
that every other signature still checks our calls. Usage: ``python tools/trt_stubs.py WHEEL OUT``;
the stubs land in OUT/tensorrt and OUT/tensorrt_bindings, for mypy's ``mypy_path`` only: never
install them into an environment (``import tensorrt`` would then succeed with no TensorRT behind it).
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
import zipfile
from pathlib import Path


def repair(source: str, limit: int = 200) -> tuple[str, int]:
    lines = source.splitlines()
    fixed = 0
    for _ in range(limit):
        try:
            ast.parse("\n".join(lines))
            return "\n".join(lines) + "\n", fixed
        except SyntaxError as e:
            i = (e.lineno or 1) - 1
            line = lines[i]
            match = re.match(r"^(\s*)def (\w+)\((self)?.*\)( -> .+)?:\s*(\.\.\.)?\s*$", line)
            if not match:
                raise SystemExit(f"cannot repair line {i + 1}: {line[:120]}") from e
            indent, name, has_self, returns, body = match.groups()
            params = (
                "self, *args: typing.Any, **kwargs: typing.Any"
                if has_self
                else "*args: typing.Any, **kwargs: typing.Any"
            )
            lines[i] = f"{indent}def {name}({params}){returns or ''}:{' ...' if body else ''}"
            fixed += 1
    raise SystemExit("too many unparsable signatures")


def main(wheel: str, out: str) -> int:
    out_dir = Path(out)
    shutil.rmtree(out_dir, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.endswith(".pyi") and name.split("/")[0] in ("tensorrt", "tensorrt_bindings"):
                target = out_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                source, fixed = repair(z.read(name).decode())
                if fixed and "\nimport typing\n" not in source:  # after any __future__ import
                    head, sep, rest = source.partition("from __future__ import annotations\n")
                    source = head + sep + "import typing\n" + rest if sep else "import typing\n" + source
                target.write_text(source)
                print(f"{name}: {fixed} signature(s) made permissive")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
