"""The load generator (benchmarks/load.py) against a fake `sdrt serve` on loopback: requests per level,
closed-loop concurrency (counted by the server), seeds, status counts, percentiles against closed forms,
rows and the report's load table, readiness errors, and a server it starts and stops itself."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sdrt.benchmarks import load
from sdrt.benchmarks.bench import device_info, device_slug
from sdrt.benchmarks.load import LoadConfig, Outcome, percentiles, summarize
from sdrt.benchmarks.report import load_label, load_rows, markdown_table, write_report
from sdrt.runtime.cpu_features import cpu_summary
from sdrt.runtime.errors import BackendError, InputError

pytest.importorskip("httpx", reason="the load generator's HTTP client (pip install httpx)")


def _always_ok(index: int) -> int:
    return 200


class FakeServe:
    """`sdrt serve`'s API in miniature on 127.0.0.1: POST /v1/images/generations sleeps ``sleep_s`` and
    answers 200 with ``num_images_per_prompt`` images, or at once with the status ``schedule(index)``
    gives the index-th request it receives; GET /readyz answers 503 until ``ready_after_s`` has passed;
    GET /metrics names its largest batch. It records each request's seed, status and how many requests
    were in flight when it arrived (itself included)."""

    def __init__(self, sleep_s=0.0, schedule=_always_ok, ready_after_s=0.0, max_batch=3, retry_after="1"):
        self.sleep_s, self.schedule, self.max_batch, self.retry_after = sleep_s, schedule, max_batch, retry_after
        self.ready_at = time.monotonic() + ready_after_s
        self.arrivals: list[tuple[int, int, int]] = []  # (seed, status, in flight on arrival)
        self.counted = Counter()  # what its /metrics exports, as `sdrt serve` names them
        self.in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn does
            disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms wait on a delayed ACK

            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: bytes, content_type="application/json", headers=()):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/readyz":
                    ready = time.monotonic() >= fake.ready_at
                    self._answer(200 if ready else 503, b'{"ready": %s}' % (b"true" if ready else b"false"))
                elif self.path == "/metrics":
                    with fake.lock:
                        counted = "".join(f"{k} {v}\n" for k, v in fake.counted.items())
                    text = (
                        f"# TYPE sdrt_max_batch gauge\nsdrt_max_batch {fake.max_batch}\nsdrt_queue_depth 0\n{counted}"
                    )
                    self._answer(200, text.encode(), "text/plain; version=0.0.4")
                else:
                    self._answer(404, b"{}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    status = fake.schedule(len(fake.arrivals))
                    fake.in_flight += 1
                    fake.arrivals.append((body["seed"], status, fake.in_flight))
                try:
                    if status != 200:
                        headers = [("Retry-After", fake.retry_after)] if status == 503 else []
                        self._answer(status, b'{"error": "fake"}', headers=headers)
                        return
                    time.sleep(fake.sleep_s)
                    n = body.get("num_images_per_prompt", 1)
                    answer = {
                        "created": int(time.time()),
                        "seed": body["seed"],
                        "data": [{"b64_json": "iVBORw0KGgo="}] * n,
                        "timings": {"total_s": fake.sleep_s, "queue": {"wait_s": 0.001}, "batched": True},
                    }
                    with fake.lock:  # as if every two images had been run as one batch
                        fake.counted.update({'sdrt_requests_total{outcome="ok"}': 1, "sdrt_batch_images_sum": n})
                        fake.counted.update({"sdrt_batch_images_count": 0.5, "sdrt_batch_images_bucket": 1})
                    self._answer(200, json.dumps(answer).encode())
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # 16 connections at once must not wait on a SYN retry

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def level(self, row: dict) -> list[tuple[int, int, int]]:
        """The counted requests of a row's level: those whose seeds the row names."""
        first, last = row["seeds"]
        return [a for a in self.arrivals if first <= a[0] <= last]


def quiet(line: str) -> None:
    pass


# -- the summary, against closed forms -------------------------------------------------------------
def test_percentiles_closed_form():
    p = percentiles([4.0, 1.0, 3.0, 2.0])  # order does not matter; linear between order statistics
    assert (p["n"], p["min"], p["max"], p["mean"]) == (4, 1.0, 4.0, 2.5)
    assert p["p50"] == pytest.approx(2.5) and p["p95"] == pytest.approx(1 + 0.95 * 3)
    assert p["p99"] == pytest.approx(1 + 0.99 * 3)
    assert percentiles([7.0]) == {"n": 1, "p50": 7.0, "p95": 7.0, "p99": 7.0, "min": 7.0, "max": 7.0, "mean": 7.0}
    assert percentiles([]) == {"n": 0}


def test_summary_of_known_latencies_and_statuses():
    # 100 answers of 200 taking 0.01, 0.02, ..., 1.00 s with 2 images each; then refusals and failures,
    # fast, which count by status and in the throughput of what was sent, never in the 200s' latency.
    ok = [Outcome(200, i / 100, images=2, timings={"total_s": i / 200}) for i in range(1, 101)]
    others = [
        *[Outcome(503, 0.001, retry_after_s=1.0)] * 5,
        Outcome(422, 0.002),
        Outcome(400, 0.002),
        Outcome(504, 30.0),
        Outcome(500, 0.003),
        Outcome(0, 0.004, error="ConnectError"),
        Outcome(200, 0.5, error="200 without a JSON `data` list"),
    ]
    s = summarize(ok[:50] + others + ok[50:], wall_s=4.0)
    assert s["sent"] == 111 and s["status"] == {"200": 100, "4xx": 2, "503": 5, "other": 4}
    assert s["status_codes"] == {"0": 1, "200": 101, "400": 1, "422": 1, "500": 1, "503": 5, "504": 1}
    assert s["errors"] == {"200 without a JSON `data` list": 1, "ConnectError": 1}
    assert s["images"] == 200 and s["images_per_s"] == pytest.approx(50.0)
    assert s["requests_per_s"] == pytest.approx(25.0) and s["sent_per_s"] == pytest.approx(111 / 4)
    lat = s["latency_s"]  # order statistics x_k = k / 100, k = 1..100: p_q = x_1 + q (x_100 - x_1)
    assert lat["n"] == 100 and lat["max"] == pytest.approx(1.0) and lat["min"] == pytest.approx(0.01)
    assert lat["p50"] == pytest.approx(0.505) and lat["p95"] == pytest.approx(0.9505)
    assert lat["p99"] == pytest.approx(0.9901) and lat["mean"] == pytest.approx(0.505)
    assert s["latency_all_s"]["n"] == 111 and s["latency_all_s"]["max"] == pytest.approx(30.0)
    assert s["server_timings"]["total_s"]["p50"] == pytest.approx(0.2525)
    empty = summarize([Outcome(503, 0.001)], wall_s=0.5)
    assert empty["latency_s"] == {"n": 0} and empty["requests_per_s"] == 0.0 and empty["sent_per_s"] == 2.0


# -- against a fake server -------------------------------------------------------------------------
REQUESTS = 32


def schedule(index: int) -> int:
    """Within each level (a warm-up and REQUESTS more, in turn): the warm-up succeeds; of the 32 counted,
    4 are refused (503), 4 are bad (422), 2 fail (500) and 22 succeed."""
    j = index % (REQUESTS + 1)
    if j == 0:
        return 200
    return 503 if j % 8 == 3 else 422 if j % 8 == 5 else 500 if j % 16 == 7 else 200


def test_levels_send_their_requests_and_count_every_status(tmp_path):
    sleep = 0.03
    body = {"prompt": "a red cube", "height": 64, "width": 64, "num_inference_steps": 2, "num_images_per_prompt": 2}
    with FakeServe(sleep_s=sleep, schedule=schedule) as fake:
        config = LoadConfig(
            url=fake.url, concurrency=(1, 4, 16), requests=REQUESTS, body=body, label="fake", results_dir=tmp_path
        )
        rows = load.run_load(config, progress=quiet)
    assert [r["concurrency"] for r in rows] == [1, 4, 16]
    # Every request the server saw had a seed of its own; per level one warm-up and REQUESTS counted.
    seeds = [a[0] for a in fake.arrivals]
    assert sorted(seeds) == list(range(3 * (REQUESTS + 1)))
    for row in rows:
        first, last = row["seeds"]
        assert last - first + 1 == REQUESTS == row["sent"] == len(fake.level(row))
        assert first - 1 not in {a[0] for r in rows for a in fake.level(r)}  # the warm-up, not counted
        # The counts are the server's own, by class and by code.
        codes = Counter(str(status) for _, status, _ in fake.level(row))
        assert row["status_codes"] == dict(sorted(codes.items()))
        assert row["status"] == {"200": 22, "4xx": 4, "503": 4, "other": 2}
        assert row["images"] == 2 * 22 and row["images_per_s"] == pytest.approx(44 / row["wall_s"])
        assert row["requests_per_s"] == pytest.approx(22 / row["wall_s"])
        # Each 200 waited the server's sleep at least; no level beats C requests per service time.
        assert row["latency_s"]["n"] == 22 and row["latency_s"]["min"] >= sleep
        assert row["requests_per_s"] <= row["concurrency"] / sleep
        assert row["server_timings"]["total_s"]["p50"] == pytest.approx(sleep)
        assert row["server_timings"]["queue.wait_s"]["n"] == 22 and "batched" not in row["server_timings"]
        # What the server's /metrics counted during the level, the warm-up excluded: 22 answers of 2 images.
        assert row["server_metrics"] == {
            "sdrt_batch_images_count": 11.0,
            "sdrt_batch_images_sum": 44.0,
            'sdrt_requests_total{outcome="ok"}': 22.0,
        }
        # Closed loop: never more in flight than the level's concurrency, as the server counted them.
        assert max(a[2] for a in fake.level(row)) <= row["concurrency"]
        assert row["in_flight_max"] <= row["concurrency"]
    assert rows[0]["in_flight_max"] == 1


def test_concurrency_is_reached_and_never_exceeded(tmp_path):
    """All 200s with a long enough service time: each level keeps exactly C requests in flight."""
    with FakeServe(sleep_s=0.1) as fake:
        config = LoadConfig(url=fake.url, concurrency=(1, 4, 8), requests=8, results_dir=tmp_path, save=False)
        rows = load.run_load(config, progress=quiet)
    for row in rows:
        assert max(a[2] for a in fake.level(row)) == row["concurrency"] == row["in_flight_max"]
        assert row["status"]["200"] == 8
    # Closed loop at C=1: the requests go one after another, so the level takes their sum.
    assert rows[0]["wall_s"] >= 8 * 0.1
    assert not list(tmp_path.iterdir())  # save=False writes nothing


@pytest.mark.parametrize("respect", [False, True])
def test_retry_after_is_waited_only_when_asked(respect):
    """One closed-loop worker gets a 503 asking for 0.3 s: with --respect-retry-after its next request
    waits that long; without, it goes at once."""
    with FakeServe(schedule=lambda i: 503 if i == 2 else 200, retry_after="0.3") as fake:
        config = LoadConfig(url=fake.url, concurrency=(1,), requests=3, save=False, respect_retry_after=respect)
        (row,) = load.run_load(config, progress=quiet)
    assert row["status"] == {"200": 2, "4xx": 0, "503": 1, "other": 0} and row["respect_retry_after"] is respect
    assert (row["wall_s"] >= 0.3) is respect


def test_rows_are_written_with_the_machine_and_the_server(tmp_path, capsys):
    with FakeServe(sleep_s=0.01, max_batch=4) as fake:
        code = load.main(
            [
                "--url", fake.url, "--concurrency", "1,2", "--requests", "3", "--steps", "2", "--size", "64x96",
                "--prompt", "x" * 100, "--seed", "1000", "--label", "batching-on", "--out", str(tmp_path),
            ]
        )  # fmt: skip
    assert code == 0
    (path,) = tmp_path.iterdir()
    device = device_info("onnxruntime")
    assert path.name == f"load_{device_slug(device)}.jsonl"  # one file per device, as the bench's rows
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["concurrency"] for r in rows] == [1, 2]
    for r in rows:
        assert (r["schema"], r["kind"], r["label"], r["url"], r["requests"]) == (1, "load", "batching-on", fake.url, 3)
        assert r["machine"]["cpu"] == cpu_summary() and r["device"] == device  # as `sdrt bench` rows describe it
        assert r["versions"]["sdrt"] and r["versions"]["httpx"]
        assert r["server"] == {"max_batch": 4, "max_batch_from": "metrics", "on_this_machine": True}
        assert r["body"] == {"prompt": "x" * 77 + "...", "height": 64, "width": 96, "num_inference_steps": 2}
        assert r["warmup"]["status"] == 200 and r["images_per_request"] == 1
        for key in ("images_per_s", "requests_per_s", "latency_s", "status", "wall_s", "timestamp", "in_flight_max"):
            assert key in r
    assert [r["seeds"] for r in rows] == [[1001, 1003], [1005, 1007]]  # 1000 and 1004: the warm-ups
    # The printed table and the merged report show every level.
    out = capsys.readouterr().out
    assert out.count(f"| {device['name']} (") == 2 and out.count(" · max batch 4 · batching-on | 64x96 2 steps |") == 2
    md, png, bars = write_report([path], tmp_path / "report")
    assert bars == 0 and not png.exists()  # load rows alone: a table, no latency chart
    text = md.read_text()
    assert "0 measured rows and 2 load rows" in text and text.count("batching-on | 64x96 2 steps |") == 2
    assert "Load rows:" in text


def test_report_shows_load_rows_beside_latency_rows(tmp_path):
    from sdrt.benchmarks.bench import stats

    latency = {
        "schema": 2,
        "device": {"kind": "cpu", "name": "AMD EPYC", "cores": 2},
        "implementation": "sdrt",
        "backend": "onnxruntime",
        "precision": "fp32",
        "threads": 2,
        "batch": 1,
        "height": 64,
        "width": 64,
        "steps": 2,
        "metrics": {k: stats([1.0, 2.0]) for k in ("end_to_end_s", "images_per_s")},
    }
    with FakeServe(sleep_s=0.0) as fake:
        config = LoadConfig(url=fake.url, concurrency=(2,), requests=2, results_dir=tmp_path, label="on")
        (row,) = load.run_load(config, progress=quiet)
    files = [tmp_path / "bench.jsonl", *tmp_path.glob("load_*.jsonl")]
    files[0].write_text(json.dumps(latency) + "\n")
    rows = load_rows(files)
    table = markdown_table(rows)
    assert "AMD EPYC (2 cores, 2 threads) · sdrt/onnxruntime · fp32" in table  # the latency table, unchanged
    assert load_label(row).endswith(" · max batch 3 · on")  # from the server's /metrics
    (line,) = [x for x in table.splitlines() if x.startswith(f"| {load_label(row)} |")]
    assert line.startswith(f"| {load_label(row)} | default size default steps | 2 | 2 | 2 / 0 / 0 / 0 |")
    assert line.endswith(" | 2 |")  # images per batch, from the server's /metrics: 2 images in 1 batch
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"kind": "load", "schema": 99}) + "\n")
    with pytest.raises(InputError, match="or a load row of schema 1"):
        load_rows([bad])


# -- readiness and bad bodies ----------------------------------------------------------------------
def test_waits_for_readyz_then_runs():
    with FakeServe(ready_after_s=0.6) as fake:
        lines = []
        config = LoadConfig(url=fake.url, concurrency=(1,), requests=1, save=False)
        (row,) = load.run_load(config, progress=lines.append)
    assert row["status"]["200"] == 1
    waited = float(lines[0].split("ready after ")[1].split(" s")[0])
    assert lines[0].startswith(f"{fake.url}/readyz: ready after") and waited >= 0.5


def test_a_server_never_ready_is_a_clear_error():
    with FakeServe(ready_after_s=3600) as fake:
        config = LoadConfig(url=fake.url, concurrency=(1,), requests=1, save=False, ready_timeout_s=0.5)
        with pytest.raises(BackendError, match=r"readyz to answer 200 within 0.5 s, the last try got status 503"):
            load.run_load(config, progress=quiet)
        assert fake.arrivals == []  # no load on a server that is not ready
    config = LoadConfig(url=f"http://127.0.0.1:{load.free_port()}", requests=1, save=False, ready_timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(
        BackendError, match=rf"GET {config.url}/readyz to answer 200 within 0.3 s, the last try got Connect"
    ):
        load.run_load(config, progress=quiet)
    assert time.monotonic() - start < 5


def test_a_body_the_server_refuses_stops_at_the_warmup(tmp_path):
    with FakeServe(schedule=lambda i: 422) as fake:
        config = LoadConfig(url=fake.url, concurrency=(1, 4), requests=8, results_dir=tmp_path)
        with pytest.raises(InputError, match=r"""the warm-up request got 422: '{"error": "fake"}'"""):
            load.run_load(config, progress=quiet)
    assert len(fake.arrivals) == 1 and not list(tmp_path.iterdir())


def test_command_line_refusals(tmp_path, capsys):
    assert load.main(["--url", "http://127.0.0.1:9", "--serve", str(tmp_path)]) == 2
    assert "expected --url or --serve" in capsys.readouterr().err
    assert load.main(["--serve", str(tmp_path), "--serve-args", "--port 9000"]) == 2
    assert "--serve-args: expected options other than --artifacts, --host, --port" in capsys.readouterr().err
    assert load.main(["--body", '{"prompt": "a"}', "--steps", "3"]) == 2
    assert "expected --body or --steps" in capsys.readouterr().err
    assert load.main(["--body", "[1, 2]"]) == 2
    assert "--body: expected a JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load.main(["--concurrency", "1,0"])
    assert "expected concurrency levels such as 1,4,16" in capsys.readouterr().err


def test_server_arguments():
    assert load.max_batch_from_args("--max-batch 4 --batch-wait-ms 20") == 4
    assert load.max_batch_from_args("--queue-size=8 --max-batch=2") == 2
    assert load.max_batch_from_args("--queue-size 8") is None
    text = '# HELP x\n# TYPE sdrt_max_batch gauge\nsdrt_requests_total{status="200"} 12 1700000000\nsdrt_max_batch 4\n'
    samples = load.parse_metrics(text)
    assert samples == {'sdrt_requests_total{status="200"}': 12.0, "sdrt_max_batch": 4.0}
    assert load.max_batch_from_metrics(samples) == 4 and load.max_batch_from_metrics({"up": 1.0}) is None
    after = {'sdrt_requests_total{status="200"}': 20.0, "sdrt_max_batch": 4.0, "x_bucket": 3.0, "y_count": 1.0}
    assert load.metrics_delta(samples, after) == {'sdrt_requests_total{status="200"}': 8.0, "y_count": 1.0}
    command = load.serve_command("artifacts/tiny-sd", 8123, "--max-batch 4 --queue-size 16")
    assert command[:4] == [sys.executable, "-m", "sdrt.runtime.cli", "serve"]
    assert command[4:] == [
        "--artifacts", "artifacts/tiny-sd", "--host", "127.0.0.1", "--port", "8123", "--max-batch", "4", "--queue-size", "16"
    ]  # fmt: skip
    with pytest.raises(InputError, match="got '--host=0.0.0.0'"):
        load.serve_command("a", 1, "--host=0.0.0.0")


# -- a server the generator starts and stops --------------------------------------------------------
FAKE_SERVE_SCRIPT = textwrap.dedent(
    """
    import json, signal, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    port, on_sigterm = int(sys.argv[1]), sys.argv[2]
    if on_sigterm == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    ready_at = time.monotonic() + 0.5  # loading and warming up

    class Handler(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def answer(self, status, body):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.answer(200 if time.monotonic() >= ready_at else 503, b"{}")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.answer(200, json.dumps({"seed": body["seed"], "data": [{"b64_json": ""}]}).encode())

    print("serving on", port, flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)


@pytest.mark.parametrize("on_sigterm", ["exit", "ignore"])
def test_serve_starts_a_server_waits_for_it_and_stops_it(tmp_path, on_sigterm):
    script = tmp_path / "fake_serve.py"
    script.write_text(FAKE_SERVE_SCRIPT)
    lines = []
    config = LoadConfig(concurrency=(2,), requests=4, results_dir=tmp_path, max_batch=4, server={"serve_args": "x"})
    rows = load.run_with_server(
        config,
        lambda port: [sys.executable, str(script), str(port), on_sigterm],
        stop_timeout_s=0.5,
        progress=lines.append,
        log_dir=tmp_path,
    )
    (row,) = rows
    assert row["status"]["200"] == 4 and row["url"].startswith("http://127.0.0.1:")
    assert row["server"] == {"max_batch": 4, "max_batch_from": "serve-args", "on_this_machine": True, "serve_args": "x"}
    pid = int(lines[0].split("(pid ")[1].split(",")[0])
    stopped = lines[-1]
    logs = list(tmp_path.glob("sdrt-serve-*.log"))
    if on_sigterm == "exit":
        assert stopped == f"server pid {pid} stopped (exit code 0)" and logs == []  # a clean stop leaves no log
    else:
        assert (
            stopped == f"server pid {pid} killed after 0.5 s without exiting on SIGTERM (exit code -9); log {logs[0]}"
        )
        assert logs[0].read_text().startswith("serving on")
    with pytest.raises(ProcessLookupError):  # stopped and reaped: no such process any more
        os.kill(pid, 0)


def test_a_server_that_exits_while_loading_is_reported_at_once(tmp_path):
    command = [sys.executable, "-c", "import sys; print('no manifest.json in artifacts/x'); sys.exit(3)"]
    config = LoadConfig(concurrency=(1,), requests=1, results_dir=tmp_path, ready_timeout_s=60)
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"(?s)it exited: exit code 3.*no manifest.json in artifacts/x"):
        load.run_with_server(config, lambda port: command, progress=quiet, log_dir=tmp_path)
    assert time.monotonic() - start < 10


def test_server_process_is_stopped_on_an_error(tmp_path):
    """An exception inside the block (here, Ctrl-C) still stops the server and keeps its log."""
    sleeper = [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(60)"]
    lines = []
    with pytest.raises(KeyboardInterrupt), load.ServerProcess(sleeper, 5, lines.append, tmp_path) as s:
        deadline = time.monotonic() + 10
        while not s.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        raise KeyboardInterrupt
    assert s.returncode == -signal.SIGTERM and not s.killed
    assert s.log_path.read_text() == "loading\n" and f"log {s.log_path}" in lines[-1]
