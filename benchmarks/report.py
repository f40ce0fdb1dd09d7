"""``sdrt bench report``: rows from many machines' result files -> one Markdown table and one chart,
and a table of the load rows (``python -m sdrt.benchmarks.load``: ``sdrt serve`` under load), if any."""

from __future__ import annotations

import json
from pathlib import Path

from sdrt.runtime.errors import InputError

# 1: one bench process; 2: a process per implementation (load time, RSS), rows per backend and compute
# precision (or why not measured), the machine's matmul rate. Fields a schema-1 row lacks show as "—".
SCHEMAS = (1, 2)
# Rows of kind "load" (benchmarks/load.py: one per level of concurrency against `sdrt serve`) number
# their own schema.
LOAD_SCHEMAS = (1,)
MISSING = "—"

# (metric key, column title, scale to the unit shown)
COLUMNS = (
    ("text_encoder_ms", "text enc ms", 1.0),
    ("unet_step_ms", "UNet step ms", 1.0),
    ("scheduler_step_ms", "sched ms", 1.0),
    ("overhead_per_step_ms", "overhead/step ms", 1.0),
    ("vae_decode_ms", "VAE dec ms", 1.0),
    ("end_to_end_s", "end to end s", 1.0),
)
CHART_METRICS = (
    ("text_encoder_ms", "text encoder (ms)"),
    ("unet_step_ms", "UNet step (ms)"),
    ("vae_decode_ms", "VAE decode (ms)"),
    ("end_to_end_s", "end to end (s)"),
)


def load_rows(files: list[Path]) -> list[dict]:
    rows = []
    for path in files:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise InputError(f"report: expected a results file (.jsonl), could not read {path}: {e}") from e
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{n}: expected one JSON row per line, got a parse error: {e}") from e
            if not (_is_load(row) and row.get("schema") in LOAD_SCHEMAS) and (
                row.get("schema") not in SCHEMAS or not ("metrics" in row or "unsupported" in row)
            ):
                raise InputError(
                    f"{path}:{n}: expected a benchmark row of schema {' or '.join(map(str, SCHEMAS))} (or a load "
                    f"row of schema {' or '.join(map(str, LOAD_SCHEMAS))}), got {str(row)[:80]!r}"
                )
            row["_file"] = str(path)
            rows.append(row)
    if not rows:
        raise InputError(f"report: expected benchmark rows in {[str(f) for f in files]}, found none")
    return rows


def label(row: dict) -> str:
    d = row["device"]
    isa = f"{d['isa']}, " if d.get("isa") else ""  # "AMD EPYC" names Zen 3 and Zen 4 alike; the ISA does not
    where = f"{d['name']} ({isa}{d['cores']} cores, {row['threads']} threads)" if d["kind"] == "cpu" else d["name"]
    impl = {"diffusers": "diffusers/PyTorch", "optimum": "optimum/onnxruntime"}.get(
        row["implementation"], f"{row['implementation']}/{row['backend']}"
    )
    vae = " · tiny VAE" if row.get("vae") == "AutoencoderTiny" else ""  # sdrt export --vae
    return f"{where} · {impl} · {row.get('precision', MISSING)}{vae}"


def case(row: dict) -> str:
    model = Path(str(row.get("model", {}).get("source") or "")).name
    return f"{model + ' ' if model else ''}b{row['batch']} {row['height']}x{row['width']} {row['steps']} steps"


def _num(v: float) -> str:
    """3 significant digits, never in exponent form: 3,250 / 187 / 0.295 / 0.0543."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _cell(metric: dict | None, scale: float = 1.0) -> str:
    if not metric or not metric.get("n"):
        return MISSING
    return f"{_num(metric['median'] * scale)} (p90 {_num(metric['p90'] * scale)})"


def measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "metrics" in r and not _is_load(r)]


def _is_load(row: dict) -> bool:
    return row.get("kind") == "load"


def _opt(value, fmt=_num) -> str:
    return MISSING if value is None else fmt(value)


def _precision(row: dict) -> str:
    """The label, and the compute precision when it is not already the label (schema 2)."""
    name, compute = row.get("precision", MISSING), row.get("compute_precision")
    return name if compute in (None, name) or compute == "fp32" else f"{name} (compute {compute})"


def _ratio_cell(row: dict) -> str:
    return (
        "; ".join(
            f"{r['end_to_end']['median']:.2f}x{'' if name == 'diffusers' else ' vs ' + name} "
            f"(p10 {r['end_to_end']['p10']:.2f}, p90 {r['end_to_end']['p90']:.2f})"
            for name, r in row.get("ratio_to", {}).items()
        )
        or MISSING
    )


def markdown_table(rows: list[dict]) -> str:
    """The measured rows as a table, then the combinations not measured and why, then the load rows."""
    loads = [r for r in rows if _is_load(r)]
    if loads and len(loads) == len(rows):
        return load_table(loads)
    return _latency_table(rows) + (f"\n\n{load_table(loads)}" if loads else "")


def _latency_table(rows: list[dict]) -> str:
    head = [
        "device · implementation · precision",
        "backend",
        "precision",
        "case",
        *(t for _, t, _ in COLUMNS),
        "img/s",
        "overhead %",
        "vs diffusers (and others), end to end",
        "UNet TFLOP/s",
        "UNet % of matmul",
        "load s",
        "peak RSS MiB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(measured(rows), key=lambda r: (case(r), label(r))):
        m = row["metrics"]
        overhead = m.get("overhead_fraction")
        fraction = row.get("unet_fraction_of_matmul")
        cells = [
            label(row),
            row.get("backend", MISSING),
            _precision(row),
            case(row),
            *(_cell(m.get(key), scale) for key, _, scale in COLUMNS),
            _num(m["images_per_s"]["median"]),
            MISSING if not overhead or not overhead.get("n") else _num(100 * overhead["median"]),
            _ratio_cell(row),
            _num(row.get("unet_tflops_achieved", 0)),
            _opt(None if fraction is None else 100 * fraction),
            _opt(row.get("load_s")),
            _opt(row.get("peak_rss_bytes"), lambda b: f"{b / 2**20:,.0f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + unsupported_list(rows)


def unsupported_list(rows: list[dict]) -> str:
    """One line per device, backend and precision asked for and not measured, with the reason."""
    seen = {}
    for r in rows:
        if "unsupported" in r:
            key = (r["device"]["name"], r.get("backend"), _precision(r), r.get("artifacts"))
            seen.setdefault(key, r["unsupported"])
    if not seen:
        return ""
    items = [
        f"- {device} · sdrt/{backend} · {precision}{f' ({Path(a).name})' if a else ''}: {reason}"
        for (device, backend, precision, a), reason in sorted(seen.items(), key=lambda kv: str(kv[0]))
    ]
    return "\n\nNot measured (the backend or this CPU lacks the precision):\n\n" + "\n".join(items)


# -- load rows: `sdrt serve` under closed-loop load, one row per level of concurrency -----------------
def _where(row: dict) -> str:
    d = row["device"]
    isa = f"{d['isa']}, " if d.get("isa") else ""
    return f"{d['name']} ({isa}{d['cores']} cores)" if d["kind"] == "cpu" else d["name"]


def load_label(row: dict) -> str:
    """Where the load ran, the server's largest batch and the run's label."""
    batch = (row.get("server") or {}).get("max_batch")
    parts = [_where(row), f"max batch {MISSING if batch is None else batch}"]
    return " · ".join([*parts, row["label"]] if row.get("label") else parts)


def load_case(row: dict) -> str:
    """The model (when the run started the server) and the request as sent; the server's defaults for
    what the body leaves out."""
    body = row.get("body") or {}
    model = Path(str((row.get("model") or {}).get("source") or "")).name
    size = f"{body['height']}x{body['width']}" if "height" in body and "width" in body else "default size"
    steps = f"{body['num_inference_steps']} steps" if "num_inference_steps" in body else "default steps"
    images = row.get("images_per_request", 1)
    return " ".join(filter(None, (model, size, steps, f"x{images} images" if images != 1 else "")))


def load_table(rows: list[dict]) -> str:
    """One line per load row: throughput of the 200 answers, their latency percentiles, counts by status."""
    head = [
        "device · server · label",
        "request",
        "concurrency",
        "requests",
        "200 / 4xx / 503 / other",
        "img/s",
        "req/s",
        "p50 s",
        "p95 s",
        "p99 s",
        "max s",
        "images per batch",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(rows, key=lambda r: (load_case(r), load_label(r), r["timestamp"], r["concurrency"])):
        s, lat = row["status"], row["latency_s"]
        cells = [
            load_label(row),
            load_case(row),
            str(row["concurrency"]),
            str(row["requests"]),
            " / ".join(str(s[c]) for c in ("200", "4xx", "503", "other")),
            _num(row["images_per_s"]),
            _num(row["requests_per_s"]),
            *(_num(lat[q]) if lat.get("n") else MISSING for q in ("p50", "p95", "p99", "max")),
            _opt(_images_per_batch(row)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _images_per_batch(row: dict) -> float | None:
    """Mean images per batch the server ran during the level, from its /metrics histogram of batch sizes
    (``sdrt serve``'s ``sdrt_batch_images``); None when the row does not have it."""
    counted = row.get("server_metrics") or {}
    total = sum(v for k, v in counted.items() if k.split("{")[0] == "sdrt_batch_images_sum")
    batches = sum(v for k, v in counted.items() if k.split("{")[0] == "sdrt_batch_images_count")
    return total / batches if batches else None


def chart(rows: list[dict], path: Path) -> int:
    """Grouped horizontal bars, one panel per metric, one bar per measured row (device, implementation,
    backend, precision, case), with p10-p90 whiskers. Returns the number of bars drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(measured(rows), key=lambda r: (case(r), label(r)))
    names = [f"{label(r)}\n{case(r)}" for r in rows]
    fig, axes = plt.subplots(
        1, len(CHART_METRICS), figsize=(5 * len(CHART_METRICS), 1.0 + 0.6 * len(rows)), sharey=True
    )
    # One colour per implementation, backend and precision, so the variants and the baselines read apart.
    kinds = sorted({_kind(r) for r in rows})
    palette = plt.get_cmap("tab10")
    color = {k: ("0.6" if k[0] == "diffusers" else palette(i % 10)) for i, k in enumerate(kinds)}
    bars = 0
    for ax, (key, title) in zip(axes, CHART_METRICS):
        values, lo, hi = [], [], []
        for r in rows:
            m = r["metrics"].get(key) or {}
            values.append(m.get("median", 0.0))
            lo.append(m.get("median", 0.0) - m.get("p10", 0.0))
            hi.append(m.get("p90", 0.0) - m.get("median", 0.0))
        drawn = ax.barh(
            range(len(rows)),
            values,
            xerr=[lo, hi],
            color=[color[_kind(r)] for r in rows],
            capsize=3,
        )
        bars += len(drawn)
        ax.set_title(title)
        if min(v for v in values if v > 0) * 20 < max(values):  # cases far apart (tiny and full-size models)
            ax.set_xscale("log")
        ax.grid(axis="x", alpha=0.3)
        for y, v in enumerate(values):
            ax.text(v, y, f" {_num(v)}", va="center", fontsize=8)
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels(names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("sdrt latency by device and implementation (median, whiskers p10-p90)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return bars


def _kind(row: dict) -> tuple[str, str, str]:
    return row["implementation"], row["backend"], row.get("precision", MISSING)


def write_report(files: list[Path], out_dir: Path) -> tuple[Path, Path, int]:
    rows = load_rows(files)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "report.md"
    png = out_dir / "report.png"
    bars = chart(rows, png) if measured(rows) else 0  # load rows alone: no latency chart
    loads = sum(map(_is_load, rows))
    md.write_text(
        "# sdrt benchmark report\n\n"
        f"{len(measured(rows))} measured rows{f' and {loads} load rows' if loads else ''} from {len(files)} "
        f"file(s): {', '.join(str(f) for f in files)}\n\n"
        "Milliseconds unless noted; median with p90 in brackets. Ratios are measured pair by pair "
        "(each sdrt run against the baseline runs of its round: every sdrt variant, then every baseline) and "
        "summarized as median (p10, p90). UNet % of matmul: the UNet's achieved FLOP/s as a share of the fp32 "
        "MatMul rate measured on the same machine in the same run. Load s and peak RSS are each "
        "implementation's own process's (schema 2). — marks a figure the row does not carry (schema 1).\n\n"
        f"{markdown_table(rows)}\n\n{'![latency chart](report.png)' if bars else ''}\n{LOAD_NOTE if loads else ''}"
    )
    return md, png, bars


LOAD_NOTE = (
    "\nLoad rows: `sdrt serve` under closed-loop load (python -m sdrt.benchmarks.load), one row per level of "
    "concurrency: that many clients, each sending its next request when its previous one has answered, after "
    "one warm-up request. img/s and req/s count the 200 answers over the level's wall time; latencies are "
    "those of the 200 answers, in seconds; `other` is 5xx other than 503, 504 and answers that never came. "
    "Images per batch: the mean over the batches the server ran during the level, from its /metrics.\n"
)
