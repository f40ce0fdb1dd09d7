"""SD 1.5-sized export on this machine (slow: ~5 min and ~4 GB of weights per precision).

Builds SD 1.5's architecture with random weights (860 M-parameter UNet, CLIP ViT-L/14, the standard
VAE), exports it in fp32 and fp16 in a subprocess as `make engines` does, and checks the result:
external data for the 3.4 GB UNet, verification against PyTorch, peak memory within this machine,
and an image from the runtime. `make test-slow` runs it; figures are printed with -s.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdrt.runtime import Manifest, Pipeline

pytestmark = pytest.mark.slow

GIB = 1024**3
MEMORY_BUDGET = 22 * GIB  # the machine has 24 GiB; leave room for the OS and the test process


@pytest.fixture(scope="module")
def sd15_model(tmp_path_factory):
    from sdrt.export.random_model import is_current, write_random_model

    shared = Path(os.environ.get("SDRT_SD15_MODEL", Path(__file__).parents[1] / "models" / "sd15-random"))
    if is_current(shared, "sd15"):
        return shared
    return write_random_model(tmp_path_factory.mktemp("sd15") / "sd15-random", preset="sd15")


# Runs one command and prints its children's peak RSS: a fresh parent, so no earlier child counts.
MEASURE = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
)


def export(model: Path, out: Path, precision: str) -> tuple[float, int]:
    """Run `sdrt export` in a child process; return its wall time and peak RSS in bytes."""
    t0 = time.perf_counter()
    command = [sys.executable, "-m", "sdrt.runtime", "export", "--model", str(model), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *command, "--precision", precision],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return time.perf_counter() - t0, int(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sd15_export_fits_this_machine(sd15_model, tmp_path, precision):
    out = tmp_path / f"sd15-{precision}"
    seconds, peak = export(sd15_model, out, precision)
    m = Manifest.load(out)
    print(f"\nSD 1.5-shaped {precision} export: {seconds:.0f} s wall, peak RSS {peak / GIB:.1f} GiB")
    for c in m.components.values():
        v = c.verification
        print(
            f"  {c.name:13s} {c.precision:5s} {sum(f.bytes for f in c.files) / 1e6:8.1f} MB  "
            f"max abs {v['max_abs_error']:.2e}  PSNR {v['psnr_db']:.1f} dB  steps "
            + ", ".join(f"{s['step']} {s['seconds']:.0f} s" for s in c.optimization["steps"])
        )
        assert v["passed"] and c.precision == precision
    assert peak < MEMORY_BUDGET
    unet = m.components["unet"]
    if precision == "fp32":  # 3.4 GB of weights: past the protobuf limit, so in a .data file
        assert [f.path for f in unet.files] == ["onnx/unet.onnx", "onnx/unet.onnx.data"]
        assert unet.files[1].bytes > 3.4e9
    else:
        assert 1.6e9 < sum(f.bytes for f in unet.files) < 1.8e9

    with Pipeline.load(out) as pipe:
        result = pipe(
            "a photograph of an astronaut riding a horse", height=256, width=256, num_inference_steps=2, seed=0
        )
    assert result.images.shape == (1, 256, 256, 3) and result.images.std() > 0
