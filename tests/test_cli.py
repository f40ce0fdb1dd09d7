"""The command line: help that explains every option, clean errors, a timed result line."""

import subprocess
import sys

import pytest

from sdrt.runtime.cli import main


def sdrt(*args):
    return subprocess.run([sys.executable, "-m", "sdrt.runtime", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", ["generate", "export", "random-model", "engines"])
def test_help_documents_every_option(command):
    import argparse

    from sdrt.runtime.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    for action in parser._actions:
        assert action.help, f"sdrt {command} {action.option_strings}: no help text"
    proc = sdrt(command, "--help")
    assert proc.returncode == 0 and parser.description.split()[0] in proc.stdout


def test_missing_artifacts_is_a_clean_error(tmp_path, capsys):
    code = main(["generate", "--artifacts", str(tmp_path), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2
    assert "sdrt generate: error: artifacts: expected" in err and "make engines" in err
    assert "Traceback" not in err


def test_generate_prints_timing_and_writes_pngs(tiny_artifacts, tmp_path, capsys):
    code = main(
        [
            "generate",
            "--artifacts",
            str(tiny_artifacts),
            "--prompt",
            "a",
            "--prompt",
            "b",
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--num-images",
            "2",
            "--out",
            str(tmp_path / "img.png"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"img-{i}.png" for i in range(4)]
    assert "4 image(s) 64x64" in out and "2 steps in" in out
