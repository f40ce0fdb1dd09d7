"""optimum's onnxruntime pipeline as a benchmark baseline, run in optimum's own environment.

optimum pins transformers < 4.58 and diffusers 0.39, so it cannot share sdrt's environment; `sdrt
bench --optimum-folder DIR` starts this script with that environment's Python and keeps it running:
one JSON request per line on stdin (prompts, size, steps, guidance, a .npy file of latents), one
JSON line of timings per request on stdout. It imports nothing from sdrt. Like sdrt's own worker
(``worker.py``) it reports its load seconds and RSS after load in its hello line, and its peak RSS
so far with each reply, so optimum's memory is its own.
"""

import json
import sys
import time
from pathlib import Path


def proc_status_bytes(key: str) -> int:
    """VmRSS or VmHWM of this process in bytes (0 where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> int:
    folder, threads = sys.argv[1], int(sys.argv[2])
    import numpy as np
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    t_load = time.perf_counter()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        torch.set_num_threads(threads)
    pipe = ORTStableDiffusionPipeline.from_pretrained(folder, session_options=options)
    pipe.set_progress_bar_config(disable=True)
    calls = {}

    def timed(name, forward):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = forward(*args, **kwargs)
            calls.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        return wrapper

    for name in ("text_encoder", "unet", "vae_decoder"):
        part = getattr(pipe, name)
        part.forward = timed(name, part.forward)
    hello = {
        "ready": True,
        "optimum": __import__("optimum.version").version.__version__,
        "load_s": time.perf_counter() - t_load,
        "rss_after_load_bytes": proc_status_bytes("VmRSS"),
    }
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        latents = torch.from_numpy(np.load(request["latents"]))
        calls.clear()
        marks = []

        def on_step_end(pipeline, i, t, kwargs, marks=marks):
            marks.append(time.perf_counter())
            return kwargs

        t0 = time.perf_counter()
        pipe(
            request["prompts"],
            height=request["height"],
            width=request["width"],
            num_inference_steps=request["steps"],
            guidance_scale=request["guidance"],
            latents=latents,
            output_type="np",
            callback_on_step_end=on_step_end,
        )
        total = time.perf_counter() - t0
        unet = calls.get("unet", [])
        start = marks[0] - unet[0] if marks and unet else t0
        walls = [b - a for a, b in zip([start, *marks], marks)]
        reply = {
            "total": total,
            "text_encoder": sum(calls.get("text_encoder", [])),
            "vae_decoder": sum(calls.get("vae_decoder", [])),
            "unet_calls": unet,
            "step_walls": walls,
            "peak_rss_bytes": proc_status_bytes("VmHWM"),
        }
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
