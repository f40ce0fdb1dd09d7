"""The runtime needs neither torch nor diffusers: a full generation in a process where they cannot load."""

import subprocess
import sys

BLOCK = (
    "import sys\n"
    "for name in ('torch', 'diffusers', 'transformers', 'onnx', 'onnxscript'):\n"
    "    sys.modules[name] = None  # any import of these now raises ImportError\n"
    "from sdrt.runtime.cli import main\n"
    "import sdrt.runtime.pipeline\n"
    "code = main(sys.argv[1:])\n"
    "assert not any(m.split('.')[0] in ('torch', 'diffusers') for m in sys.modules if sys.modules[m]), 'leaked'\n"
    "sys.exit(code)\n"
)


def test_generate_without_torch(tiny_artifacts, tmp_path):
    out = tmp_path / "cat.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCK,
            "generate",
            "--artifacts",
            str(tiny_artifacts),
            "--prompt",
            "a cat",
            "--steps",
            "3",
            "--height",
            "64",
            "--width",
            "96",
            "--seed",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    assert Image.open(out).size == (96, 64)
    assert "wrote" in proc.stdout and "steps in" in proc.stdout
    assert "3/3 steps" in proc.stderr  # the progress bar


def test_importing_the_runtime_loads_only_numpy():
    code = (
        "import sys, sdrt.runtime\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'tokenizers', 'PIL', 'diffusers') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
