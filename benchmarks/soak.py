"""Soak: one Pipeline called from many threads with a mix of valid and invalid requests.

Every valid request must return exactly the image a serial run with the same arguments returns; every
invalid one must get its error (and the pipeline must go on serving); memory must not grow with the
number of calls: the process's peak RSS after the whole run stays within 5% of its peak after the first
``threads`` x ... requests (the warm-up). Run it with ``make soak`` or::

    python -m sdrt.benchmarks.soak --artifacts artifacts/tiny-sd --threads 8 --requests 50
"""

from __future__ import annotations

import argparse
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import InputError

# Valid requests cycle through these (prompt, seed, steps); invalid ones through INVALID.
VALID = [(f"a photo of object {i}", 1000 + i, 2 + i % 3) for i in range(6)]
INVALID = [
    ({"width": 0}, InputError),
    ({"guidance_scale": float("nan")}, InputError),
    ({"prompt": None}, InputError),
    ({"seed": -1}, InputError),
    ({"height": 65536, "width": 65536}, InputError),  # BudgetError is an InputError
    ({"num_inference_steps": 0}, InputError),
]
INVALID_EVERY = 4  # every 4th request of each thread is invalid


@dataclass
class SoakReport:
    threads: int
    requests_per_thread: int
    valid: int = 0
    valid_identical: int = 0
    invalid: int = 0
    invalid_refused: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    serial_seconds_per_request: float = 0.0
    peak_rss_warm_mib: float = 0.0  # after the first `warmup` requests
    peak_rss_end_mib: float = 0.0
    warmup: int = 0

    @property
    def growth(self) -> float:
        return self.peak_rss_end_mib / self.peak_rss_warm_mib - 1

    def ok(self, tolerance: float = 0.05) -> bool:
        return (
            not self.failures
            and self.valid_identical == self.valid
            and self.invalid_refused == self.invalid
            and self.growth <= tolerance
        )

    def table(self) -> str:
        rows = [
            ("threads x requests", f"{self.threads} x {self.requests_per_thread}"),
            ("valid requests identical to the serial run", f"{self.valid_identical} / {self.valid}"),
            ("invalid requests refused with their error", f"{self.invalid_refused} / {self.invalid}"),
            (
                "wall time",
                f"{self.seconds:.1f} s ({self.seconds / (self.threads * self.requests_per_thread):.3f} s/request)",
            ),
            ("serial time per valid request", f"{self.serial_seconds_per_request:.3f} s"),
            (f"peak RSS after the first {self.warmup} requests", f"{self.peak_rss_warm_mib:,.1f} MiB"),
            ("peak RSS after the run", f"{self.peak_rss_end_mib:,.1f} MiB ({self.growth:+.2%})"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines += [f"FAILURE: {f}" for f in self.failures[:10]]
        return "\n".join(lines)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def soak(pipe, threads: int = 8, requests: int = 50, size: int = 128, warmup: int | None = None) -> SoakReport:
    """Run the soak on an open Pipeline; ``size``: height and width of every valid request."""
    base = {"height": size, "width": size}
    report = SoakReport(threads, requests, warmup=warmup or requests)
    t0 = time.perf_counter()
    reference = {}
    for prompt, seed, steps in VALID:  # the serial run: what each request must return
        reference[seed] = pipe(prompt, seed=seed, num_inference_steps=steps, **base).images
    report.serial_seconds_per_request = (time.perf_counter() - t0) / len(VALID)

    lock, done = threading.Lock(), [0]

    def record(failure: str | None = None, *, valid: bool, good: bool) -> None:
        with lock:
            if valid:
                report.valid += 1
                report.valid_identical += good
            else:
                report.invalid += 1
                report.invalid_refused += good
            if failure:
                report.failures.append(failure)
            done[0] += 1
            if done[0] == report.warmup:
                report.peak_rss_warm_mib = _peak_rss_mib()

    def worker(t: int) -> None:
        for j in range(requests):
            k = t * requests + j
            if j % INVALID_EVERY == INVALID_EVERY - 1:
                bad, error = INVALID[k % len(INVALID)]
                args = {"prompt": "a photo", "seed": 0, "num_inference_steps": 2, **base, **bad}
                try:
                    pipe(**args)
                except error:
                    record(valid=False, good=True)
                except Exception as e:  # noqa: BLE001 - a soak reports every way a call can fail
                    record(f"thread {t} request {j} {bad}: {type(e).__name__}: {e}", valid=False, good=False)
                else:
                    record(f"thread {t} request {j} {bad}: returned an image", valid=False, good=False)
                continue
            prompt, seed, steps = VALID[k % len(VALID)]
            try:
                images = pipe(prompt, seed=seed, num_inference_steps=steps, **base).images
            except Exception as e:  # noqa: BLE001
                record(f"thread {t} request {j}: {type(e).__name__}: {e}", valid=True, good=False)
                continue
            same = np.array_equal(images, reference[seed])
            record(None if same else f"thread {t} request {j} (seed {seed}): image differs", valid=True, good=same)

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(t,), name=f"soak-{t}") for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    report.seconds = time.perf_counter() - t0
    report.peak_rss_end_mib = _peak_rss_mib()
    return report


def main(argv: list[str] | None = None) -> int:
    from sdrt.runtime import Pipeline

    p = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/tiny-sd"))
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--requests", type=int, default=50, help="requests per thread")
    p.add_argument("--size", type=int, default=128, help="height and width of the valid requests")
    args = p.parse_args(argv)
    with Pipeline.load(args.artifacts, backend=args.backend) as pipe:
        report = soak(pipe, args.threads, args.requests, args.size)
    print(report.table())
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
