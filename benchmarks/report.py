"""``sdrt bench report``: rows from many machines' result files -> one Markdown table and one chart,
a comparison of the devices (a line per case with every device's latency side by side, the speedup
against a baseline device, images/s and cost per image) with its own chart, and a table of the load rows
(``python -m sdrt.benchmarks.load``: ``sdrt serve`` under load), if any."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from sdrt.benchmarks.devices import device_key, device_label
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
                row.get("schema") not in SCHEMAS or not ("metrics" in row or "unsupported" in row or "failed" in row)
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
    return f"{where} · {_implementation(row)} · {row.get('precision', MISSING)}{_vae(row)}{_lora(row)}{_control(row)}"


LORA_MODES = {"base": "no LoRA", "one": "one LoRA", "switching": "LoRA set switched every call"}


def _lora(row: dict) -> str:
    mode = (row.get("lora") or {}).get("mode")
    return f" · {LORA_MODES.get(mode, mode)}" if mode else ""


def _control(row: dict) -> str:
    n = (row.get("controlnet") or {}).get("count")
    return f" · {n} ControlNet{'s' if n > 1 else ''}" if n else ""


def _implementation(row: dict) -> str:
    return {"diffusers": "diffusers/PyTorch", "optimum": "optimum/onnxruntime"}.get(
        row["implementation"], f"{row['implementation']}/{row['backend']}"
    )


def _vae(row: dict) -> str:
    return " · tiny VAE" if row.get("vae") == "AutoencoderTiny" else ""  # sdrt export --vae


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
    """The measured rows as a table, then the combinations not measured and why, then the LoRA rows, then
    the load rows."""
    loads = [r for r in rows if _is_load(r)]
    if loads and len(loads) == len(rows):
        return load_table(loads)
    loras = [r for r in measured(rows) if r.get("lora")]
    controlled = [r for r in measured(rows) if r.get("controlnet")]
    return (
        _latency_table(rows)
        + (f"\n\n{lora_table(loras)}" if loras else "")
        + (f"\n\n{controlnet_table(controlled)}" if controlled else "")
        + (f"\n\n{load_table(loads)}" if loads else "")
    )


def lora_table(rows: list[dict]) -> str:
    """LoRA rows (sdrt bench --loras): per case and variant, the base model, one adapter set and a set switched
    on every call side by side: UNet step, end to end, getting the call's adapter sessions (a dictionary
    lookup once the set is cached), each set's first use (merging and opening its sessions), peak memory, and
    the ratios to the same variant without adapters, round by round."""
    head = [
        "case",
        "device · implementation · precision · LoRA",
        "adapters (rank, modules)",
        "UNet step ms",
        "end to end s",
        "adapter sessions per call ms",
        "first use of a set s",
        "UNet step vs no LoRA",
        "end to end vs no LoRA",
        "peak RSS MiB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {mode: i for i, mode in enumerate(LORA_MODES)}

    def key(r: dict) -> tuple:  # per case and variant: no LoRA, one, switching; each in the order measured
        return (case(r), label(r).removesuffix(_lora(r)), order.get(r["lora"].get("mode"), 9), r.get("timestamp", ""))

    for row in sorted(rows, key=key):
        m, lora = row["metrics"], row["lora"]
        sets = [" + ".join(f"{f['name']} r{'/'.join(map(str, f['ranks']))} x{f['modules']}" for f in one) or "base"
                for one in lora.get("sets") or []]  # fmt: skip
        first = [x for x in lora.get("first_use_s") or [] if x is not None]
        ratio = (row.get("ratio_to") or {}).get("sdrt without LoRA")
        lines.append(
            "| "
            + " | ".join(
                [
                    case(row),
                    label(row),
                    "; then ".join(sets) if sets else MISSING,
                    _cell(m.get("unet_step_ms")),
                    _cell(m.get("end_to_end_s")),
                    _cell(m.get("lora_ms")),
                    ", ".join(_num(x) for x in first) or MISSING,
                    _ratio(ratio, "unet_step"),
                    _ratio(ratio, "end_to_end"),
                    _opt(row.get("peak_rss_bytes"), lambda b: f"{b / 2**20:,.0f}"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def controlnet_table(rows: list[dict]) -> str:
    """ControlNet rows (sdrt bench --controlnets): per case and implementation, the ControlNet's calls per step,
    the whole step, and what a ControlNet step costs relative to a plain step of the same implementation (round
    by round: the median of each round's controlled step over its plain step), end to end likewise."""
    head = [
        "case",
        "device · implementation · precision · ControlNets",
        "ControlNet calls per step ms",
        "UNet step ms",
        "whole step ms",
        "end to end s",
        "step vs plain step",
        "end to end vs plain",
        "peak RSS MiB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(rows, key=lambda r: (case(r), label(r))):
        m, ratio = row["metrics"], row.get("ratio_to") or {}
        plain = ratio.get("sdrt without ControlNet") or ratio.get("diffusers without ControlNet")
        cells = [
            case(row),
            label(row),
            _cell(m.get("controlnet_step_ms")),
            _cell(m.get("unet_step_ms")),
            _cell(m.get("step_wall_ms")),
            _cell(m.get("end_to_end_s")),
            _ratio(plain, "step_wall"),
            _ratio(plain, "end_to_end"),
            _opt(row.get("peak_rss_bytes"), lambda b: f"{b / 2**20:,.0f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(ratio: dict | None, key: str) -> str:
    r = (ratio or {}).get(key)
    if not r or not r.get("n"):
        return MISSING
    return f"{r['median']:.3f}x (p10 {r['p10']:.3f}, p90 {r['p90']:.3f})"


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
    return "\n".join(lines) + unsupported_list(rows) + failed_list(rows)


def unsupported_list(rows: list[dict]) -> str:
    """One line per device, implementation, backend and precision asked for and not measured, with the reason."""
    seen = {}
    for r in rows:
        if "unsupported" in r:
            key = (r["device"]["name"], r.get("implementation", "sdrt"), r.get("backend"), _precision(r),
                   r.get("artifacts"))  # fmt: skip
            seen.setdefault(key, r["unsupported"])
    if not seen:
        return ""
    items = [
        f"- {device} · {impl}/{backend} · {precision}{f' ({Path(a).name})' if a else ''}: {reason}"
        for (device, impl, backend, precision, a), reason in sorted(seen.items(), key=lambda kv: str(kv[0]))
    ]
    return "\n\nNot measured (the backend or this CPU lacks the precision):\n\n" + "\n".join(items)


FAILED_CHARS = 400  # of each error in the table's list (the row keeps it whole)


def failed_list(rows: list[dict]) -> str:
    """One line per failed implementation and case: where it failed and the start of its error."""
    items = []
    for r in sorted((r for r in rows if "failed" in r), key=lambda r: (case(r), str(r.get("lane")))):
        error = " ".join(str(r["failed"]).split())
        error = error if len(error) <= FAILED_CHARS else error[: FAILED_CHARS - 1] + "…"
        items.append(f"- {r['device']['name']} · {r.get('lane') or r.get('implementation')} · {case(r)}: failed in "
                     f"{r.get('failed_in', 'a run')}: {error}")  # fmt: skip
    if not items:
        return ""
    return "\n\nFailed (recorded as rows; the run measured the rest):\n\n" + "\n".join(items)


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
        positive = [v for v in values if v > 0]  # none when no row carries the metric
        if positive and min(positive) * 20 < max(positive):  # cases far apart (tiny and full-size models)
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


# -- devices side by side: a line per case, the devices' latencies in columns -------------------------
DEFAULT_GUIDANCE = 7.5  # sdrt bench's default; a case run at another scale says so


@dataclass(frozen=True, order=True)
class Case:
    """What a row measured, apart from the machine: rows of different devices with equal cases compare."""

    model: str
    height: int
    width: int
    batch: int
    steps: int
    implementation: str  # with its backend: "sdrt/onnxruntime", "diffusers/PyTorch"
    precision: str
    vae: str  # "" or " · tiny VAE"
    guidance: float  # classifier-free guidance doubles the UNet's batch: not the same work

    @classmethod
    def of(cls, row: dict) -> Case:
        guidance = row.get("guidance_scale")
        return cls(
            model=Path(str((row.get("model") or {}).get("source") or "")).name,
            height=row["height"],
            width=row["width"],
            batch=row["batch"],
            steps=row["steps"],
            implementation=_implementation(row),
            precision=_precision(row),
            vae=_vae(row),
            guidance=DEFAULT_GUIDANCE if guidance is None else float(guidance),
        )

    def __str__(self) -> str:
        model = f"{self.model} " if self.model else ""
        cfg = "" if self.guidance == DEFAULT_GUIDANCE else f" cfg {self.guidance:g}"
        return (
            f"{model}b{self.batch} {self.height}x{self.width} {self.steps} steps{cfg} · "
            f"{self.implementation} · {self.precision}{self.vae}"
        )


@dataclass
class Comparison:
    """The measured rows by case and device: the latest row of each, the baseline and the prices."""

    devices: list[str]  # device keys: the baseline first, then the others as the files give them
    labels: dict[str, str]  # device key -> device_label
    baseline: str
    prices: dict[str, float] = field(default_factory=dict)  # device key -> USD per hour (the devices priced)
    latest: dict[tuple[Case, str], dict] = field(default_factory=dict)  # (case, device key) -> its latest row
    superseded: dict[str, int] = field(default_factory=dict)  # device key -> rows a later run replaced
    threads: dict[str, set[int]] = field(default_factory=dict)  # device key -> thread counts of its rows kept

    @property
    def cases(self) -> list[Case]:
        return sorted({case for case, _ in self.latest})

    def name(self, device: str) -> str:
        """A short name for the columns: A, B, ... in the order of ``devices`` (A is the baseline)."""
        i = self.devices.index(device)
        return chr(ord("A") + i) if i < 26 else f"D{i + 1}"

    def median(self, case: Case, device: str, metric: str) -> float | None:
        row = self.latest.get((case, device))
        m = row["metrics"].get(metric) if row else None
        return m["median"] if m and m.get("n") else None

    def speedup(self, case: Case, device: str, metric: str = "end_to_end_s") -> float | None:
        """The baseline's median latency over this device's, on the same case: 2.0 is twice as fast."""
        base, mine = self.median(case, self.baseline, metric), self.median(case, device, metric)
        return base / mine if base and mine else None

    def cost_per_image(self, case: Case, device: str) -> float | None:
        """USD per image: the device's price per hour / 3600 / its median images per second."""
        price, rate = self.prices.get(device), self.median(case, device, "images_per_s")
        return price / 3600 / rate if price is not None and rate else None


def compare(
    rows: list[dict], baseline: str | None = None, prices: list[str] | dict[str, float] | None = None
) -> Comparison:
    """Group the measured rows by case and device (``device_key``), keeping the latest row (by timestamp,
    then the later in the files) of a device and case measured more than once. ``baseline`` and the
    devices of ``prices`` ("DEVICE=USD_PER_HOUR" strings, or a dict) name a device by its key or a part
    of its key or label that matches it alone; without ``baseline``, the first device in the files."""
    labels: dict[str, str] = {}
    latest: dict[tuple[Case, str], dict] = {}
    superseded: dict[str, int] = {}
    for row in measured(rows):
        key = device_key(row["device"])
        labels.setdefault(key, device_label(row["device"]))
        slot = (Case.of(row), key)
        old = latest.get(slot)
        if old is not None:
            superseded[key] = superseded.get(key, 0) + 1
        if old is None or str(row.get("timestamp") or "") >= str(old.get("timestamp") or ""):
            latest[slot] = row
    if not labels:
        raise InputError("report: expected measured benchmark rows to compare devices, found none")
    base = resolve_device(baseline, labels, "--baseline") if baseline is not None else next(iter(labels))
    priced: dict[str, float] = {}
    for spec, usd in prices.items() if isinstance(prices, dict) else map(parse_price, prices or ()):
        key = resolve_device(spec, labels, "--price")
        if key in priced:
            raise InputError(f"--price: expected one price per device, got two for {key} ({labels[key]})")
        if not (math.isfinite(usd) and usd >= 0):
            raise InputError(f"--price {spec}: expected a price per hour in USD of 0 or more, got {usd}")
        priced[key] = usd
    threads: dict[str, set[int]] = {}
    for (_, key), row in latest.items():
        threads.setdefault(key, set()).add(row["threads"])
    return Comparison(
        devices=[base, *(k for k in labels if k != base)],
        labels=labels,
        baseline=base,
        prices=priced,
        latest=latest,
        superseded=superseded,
        threads=threads,
    )


def parse_price(text: str) -> tuple[str, float]:
    """``DEVICE=USD_PER_HOUR`` -> (DEVICE, price); DEVICE as for ``resolve_device``."""
    device, sep, usd = text.rpartition("=")
    try:
        price = float(usd)
    except ValueError:
        price = math.nan
    if not sep or not device.strip() or math.isnan(price):
        raise InputError(f"--price: expected DEVICE=USD_PER_HOUR such as cpu_amd-epyc_2c=0.10, got {text!r}")
    return device.strip(), price


def resolve_device(spec: str, labels: dict[str, str], option: str = "--baseline") -> str:
    """The device key ``spec`` names: a key or label in full (any case), else the one device whose key or
    label contains it. None or several: an InputError listing the devices."""
    wanted = spec.strip().lower()
    available = "; ".join(f"{key} ({text})" for key, text in labels.items())
    if not wanted:
        raise InputError(f"{option}: expected a device, got an empty name; devices in these rows: {available}")
    exact = [key for key, text in labels.items() if wanted in (key.lower(), text.lower())]
    found = exact or [key for key, text in labels.items() if wanted in key.lower() or wanted in text.lower()]
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(f"{option} {spec!r}: expected a device of these rows, none matches; devices: {available}")
    raise InputError(
        f"{option} {spec!r}: expected one device, it matches {len(found)} ({', '.join(found)}); give more of the "
        f"key; devices: {available}"
    )


def _times(v: float) -> str:
    return f"{v:.2f}x"


def _usd(v: float) -> str:
    """3 significant digits, never in exponent form: $0.000743, $0.0000139, $1.25."""
    if v == 0 or abs(v) >= 100:
        return f"${v:,.0f}"
    return f"${v:.{max(0, 2 - math.floor(math.log10(abs(v))))}f}"


def comparison_table(cmp: Comparison) -> str:
    """A line per case; per metric a column per device: end-to-end latency (s), speedup against the
    baseline, UNet step (ms) and its speedup, images per second, USD per image (the devices priced)."""
    devices, others = cmp.devices, cmp.devices[1:]
    n = cmp.name
    head = [
        "case",
        *(f"{n(d)} end to end s" for d in devices),
        *(f"{n(d)} speedup" for d in others),
        *(f"{n(d)} UNet step ms" for d in devices),
        *(f"{n(d)} UNet speedup" for d in others),
        *(f"{n(d)} img/s" for d in devices),
        *(f"{n(d)} $/image" for d in devices if d in cmp.prices),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cmp.cases:
        cells = [
            str(c),
            *(_opt(cmp.median(c, d, "end_to_end_s")) for d in devices),
            *(_opt(cmp.speedup(c, d), _times) for d in others),
            *(_opt(cmp.median(c, d, "unet_step_ms")) for d in devices),
            *(_opt(cmp.speedup(c, d, "unet_step_ms"), _times) for d in others),
            *(_opt(cmp.median(c, d, "images_per_s")) for d in devices),
            *(_opt(cmp.cost_per_image(c, d), _usd) for d in devices if d in cmp.prices),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_step_table(cmp: Comparison) -> str:
    """The UNet step compared across step counts: a step costs the same however many a run takes, so rows
    of one model, size, batch, implementation and precision compare per step even where the devices ran
    different step counts (the latest row of each device; its step count in brackets)."""
    latest: dict[tuple[Case, str], dict] = {}
    for (case, device), row in cmp.latest.items():
        slot = (replace(case, steps=0), device)
        old = latest.get(slot)
        if old is None or str(row.get("timestamp") or "") >= str(old.get("timestamp") or ""):
            latest[slot] = row

    def step_ms(case: Case, device: str) -> float | None:
        m = latest[(case, device)]["metrics"].get("unet_step_ms") if (case, device) in latest else None
        return m["median"] if m and m.get("n") else None

    devices, others, n = cmp.devices, cmp.devices[1:], cmp.name
    head = ["model, batch, size · implementation · precision", *(f"{n(d)} UNet step ms" for d in devices)]
    head += [f"{n(d)} per-step speedup" for d in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in sorted({c for c, _ in latest}):
        cells = [str(case).replace(" 0 steps", "")]
        for d in devices:
            ms = step_ms(case, d)
            cells.append(_opt(ms) + (f" ({latest[(case, d)]['steps']} steps)" if ms is not None else ""))
        base = step_ms(case, cmp.baseline)
        for d in others:
            mine = step_ms(case, d)
            cells.append(_opt(base / mine if base and mine else None, _times))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def devices_table(cmp: Comparison) -> str:
    """The devices compared: short name, label, key, threads, price, cases and rows superseded."""
    lines = ["| | device | key | threads | $/hour | cases | runs superseded |", "|---|---|---|---|---|---|---|"]
    for d in cmp.devices:
        cells = [
            f"{cmp.name(d)}{' (baseline)' if d == cmp.baseline else ''}",
            cmp.labels[d],
            f"`{d}`",
            ", ".join(map(str, sorted(cmp.threads.get(d, ())))),
            _opt(cmp.prices.get(d), lambda p: f"{p:,.2f}" if p >= 0.01 or p == 0 else f"{p:g}"),
            str(sum(1 for _, key in cmp.latest if key == d)),
            str(cmp.superseded.get(d, 0)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_markdown(cmp: Comparison, chart_file: str | None = None) -> str:
    baseline = f"{cmp.name(cmp.baseline)}, {cmp.labels[cmp.baseline]}"
    return (
        f"## Devices compared\n\n{devices_table(cmp)}\n\n{comparison_table(cmp)}\n\n"
        f"A line per case (model, batch, size, steps, implementation/backend, precision). Seconds end to end and "
        f"milliseconds per UNet step are the medians of the device's row; speedup is the baseline's (device {baseline}) "
        f"median over the device's on the same case, so 2.00x is twice as fast. img/s: the row's median images "
        f"per second. $/image: the device's price per hour (--price) / 3600 / img/s. — : the device (or, for a "
        f"speedup, the baseline) did not measure the case. A device that measured a case more than once "
        f"(repeated runs) is represented by its latest row; the earlier ones are counted as superseded above.\n"
        + f"\n### UNet step across step counts\n\n{per_step_table(cmp)}\n\n"
        "A UNet step costs the same whatever the run's step count, so this compares devices per step where "
        "they ran the same model, batch, size, implementation and precision at different step counts.\n"
        + (f"\n![device comparison]({chart_file})\n" if chart_file else "")
    )


def compare_chart(cmp: Comparison, path: Path) -> list[dict]:
    """Horizontal bars, a group per case and a bar per device: end-to-end latency (median, whiskers
    p10-p90), each bar labelled with its speedup against the baseline. Returns the bars as drawn (read
    back from the plot): case, device key, end_to_end_s (the bar's length) and the label beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases, devices = cmp.cases, cmp.devices
    height = 0.8 / len(devices)
    fig, ax = plt.subplots(figsize=(12, 1.5 + len(cases) * (0.3 + 0.28 * len(devices))))
    palette = plt.get_cmap("tab10")
    drawn: list[dict] = []
    for j, d in enumerate(devices):
        at = [(i, c) for i, c in enumerate(cases) if cmp.median(c, d, "end_to_end_s") is not None]
        metrics = [cmp.latest[(c, d)]["metrics"]["end_to_end_s"] for _, c in at]
        values = [m["median"] for m in metrics]
        bars = ax.barh(
            [i + (j - (len(devices) - 1) / 2) * height for i, _ in at],
            values,
            height=0.92 * height,
            xerr=[
                [max(0.0, m["median"] - m.get("p10", m["median"])) for m in metrics],
                [max(0.0, m.get("p90", m["median"]) - m["median"]) for m in metrics],
            ],
            color=palette(j % 10),
            capsize=2,
            label=f"{cmp.name(d)}: {cmp.labels[d]}{' (baseline)' if d == cmp.baseline else ''}",
        )
        for rect, (_, c), m in zip(bars.patches, at, metrics):
            speedup = cmp.speedup(c, d)
            base = cmp.name(cmp.baseline)
            note = "baseline" if d == cmp.baseline else f"{MISSING if speedup is None else _times(speedup)} vs {base}"
            text = f" {cmp.name(d)} {_num(rect.get_width())} s · {note}"
            ax.text(
                max(rect.get_width(), m.get("p90", 0.0)),
                rect.get_y() + rect.get_height() / 2,
                text,
                va="center",
                fontsize=7,
            )
            drawn.append({"case": str(c), "device": d, "end_to_end_s": rect.get_width(), "label": text.strip()})
    values = [b["end_to_end_s"] for b in drawn if b["end_to_end_s"] > 0]
    if values and min(values) * 20 < max(values):  # cases far apart (tiny and full-size models)
        ax.set_xscale("log")
    ax.set_yticks(range(len(cases)))
    ax.set_yticklabels([str(c).replace(" · ", "\n", 1) for c in cases], fontsize=8)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("end to end, seconds (median; whiskers p10-p90)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"sdrt by device: end-to-end latency per case, speedup against {cmp.name(cmp.baseline)}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def write_report(
    files: list[Path],
    out_dir: Path,
    baseline: str | None = None,
    prices: list[str] | dict[str, float] | None = None,
) -> tuple[Path, Path, int]:
    """report.md (the per-row table, the device comparison, the load rows), report.png (per row) and
    compare.png (per case and device) in ``out_dir``. Returns report.md, report.png and its bar count."""
    rows = load_rows(files)
    comparison = compare(rows, baseline, prices) if measured(rows) else None  # bad device names: before writing
    if comparison is None and (baseline is not None or prices):
        raise InputError(
            "--baseline/--price: expected measured benchmark rows to compare devices, found only load rows"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "report.md"
    png = out_dir / "report.png"
    bars = chart(rows, png) if measured(rows) else 0  # load rows alone: no latency chart
    if comparison is not None:
        compare_chart(comparison, out_dir / COMPARE_CHART)
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
        + (f"\n{comparison_markdown(comparison, COMPARE_CHART)}" if comparison is not None else "")
    )
    return md, png, bars


COMPARE_CHART = "compare.png"


LOAD_NOTE = (
    "\nLoad rows: `sdrt serve` under closed-loop load (python -m sdrt.benchmarks.load), one row per level of "
    "concurrency: that many clients, each sending its next request when its previous one has answered, after "
    "one warm-up request. img/s and req/s count the 200 answers over the level's wall time; latencies are "
    "those of the 200 answers, in seconds; `other` is 5xx other than 503, 504 and answers that never came. "
    "Images per batch: the mean over the batches the server ran during the level, from its /metrics.\n"
)
