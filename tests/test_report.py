"""`sdrt bench report` comparing devices: a line per case with every device's latency side by side, the
speedup against a baseline device, images/s and cost per image, and the chart of the same; the numbers are
checked against the rows they came from (hand-written rows of known medians, two devices)."""

from __future__ import annotations

import json

import matplotlib
import pytest

from sdrt.benchmarks.devices import device_key, device_label
from sdrt.benchmarks.report import COMPARE_CHART, compare, compare_chart, comparison_table, write_report
from sdrt.runtime import InputError
from sdrt.runtime.cli import main

OLD = {"kind": "cpu", "name": "AMD EPYC 7R13", "cores": 2, "isa": "avx2"}
NEW = {"kind": "cpu", "name": "AMD EPYC 9R14", "cores": 2, "isa": "avx512-vnni-bf16"}
GPU = {"kind": "gpu", "name": "NVIDIA L4", "cores": 8}


def metric(median: float) -> dict:
    return {"n": 3, "median": median, "p10": 0.9 * median, "p90": 1.1 * median, "min": 0.9 * median}


def row(device, implementation="sdrt", backend="onnxruntime", precision="fp32", e2e=10.0, unet=100.0, ips=None, **kw):
    """A schema-2 row: e2e seconds, UNet step ms and images/s medians as given (images/s: batch / e2e)."""
    batch = kw.pop("batch", 1)
    return {
        "schema": 2,
        "timestamp": kw.pop("timestamp", "2026-12-01T10:00:00Z"),
        "device": device,
        "model": {"family": "sd1", "source": "models/sd15-random"},
        "implementation": implementation,
        "backend": backend,
        "precision": precision,
        "compute_precision": precision,
        "threads": 2,
        "batch": batch,
        "height": kw.pop("height", 256),
        "width": 256,
        "steps": kw.pop("steps", 25),
        "guidance_scale": 7.5,
        "metrics": {
            "end_to_end_s": metric(e2e),
            "unet_step_ms": metric(unet),
            "images_per_s": metric(batch / e2e if ips is None else ips),
        },
        **kw,
    }


@pytest.fixture
def two_devices(tmp_path):
    """Two machines' files. Cases: sdrt fp32 and diffusers on both; int8 on the new machine only; the new
    machine ran sdrt fp32 three times (the latest by timestamp, not by file order, counts); batch 2 on both
    with images/s not 1/e2e, so the table must take the rows' images/s."""
    old = [
        row(OLD, e2e=60.0, unet=2000.0),
        row(OLD, "diffusers", "pytorch", e2e=80.0, unet=3000.0),
        row(OLD, e2e=100.0, unet=2100.0, batch=2, ips=1.6),
    ]
    new = [
        row(NEW, e2e=40.0, unet=1500.0, timestamp="2026-12-02T09:00:00Z"),  # superseded
        row(NEW, e2e=25.0, unet=800.0, timestamp="2026-12-02T11:00:00Z"),  # the latest
        row(NEW, e2e=45.0, unet=1600.0, timestamp="2026-12-02T10:00:00Z"),  # later in the file, earlier in time
        row(NEW, "diffusers", "pytorch", e2e=50.0, unet=2000.0),
        row(NEW, precision="int8", e2e=20.0, unet=700.0),
        row(NEW, e2e=45.0, unet=900.0, batch=2, ips=4.0),
    ]
    files = []
    for name, rows in (("old.jsonl", old), ("new.jsonl", new)):
        files.append(tmp_path / name)
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files, old, new


def tables(text: str) -> list[list[dict]]:
    """Every Markdown table in ``text``, as a list of {header: cell} per line."""
    blocks, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            head, _, *body = block
            blocks.append([dict(zip(head, cells, strict=True)) for cells in body])
            block = []
    return blocks


def comparison_lines(text: str) -> dict[str, dict]:
    """The comparison table (the one with a `case` column and a column per device), by case."""
    (table,) = [t for t in tables(text) if t and "A end to end s" in t[0]]
    return {line["case"]: line for line in table}


def number(cell: str) -> float:
    return float(cell.removeprefix("$").removesuffix("x").replace(",", ""))


SDRT = "sd15-random b1 256x256 25 steps · sdrt/onnxruntime · fp32"
DIFFUSERS = "sd15-random b1 256x256 25 steps · diffusers/PyTorch · fp32"
INT8 = "sd15-random b1 256x256 25 steps · sdrt/onnxruntime · int8"
BATCH2 = "sd15-random b2 256x256 25 steps · sdrt/onnxruntime · fp32"


def test_table_gives_speedup_images_per_second_and_cost_from_the_rows(two_devices, tmp_path):
    files, old, new = two_devices
    prices = {"old": 0.36, "new": 1.08}
    md, _, _ = write_report(files, tmp_path / "out", baseline="7R13", prices=[f"9R14={prices['new']}", "avx2=0.36"])
    lines = comparison_lines(md.read_text())
    assert set(lines) == {SDRT, DIFFUSERS, INT8, BATCH2}
    latest = {SDRT: new[1], DIFFUSERS: new[3], INT8: new[4], BATCH2: new[5]}
    base = {SDRT: old[0], DIFFUSERS: old[1], BATCH2: old[2]}
    for case, mine in latest.items():
        line = lines[case]
        m = mine["metrics"]
        assert number(line["B end to end s"]) == pytest.approx(m["end_to_end_s"]["median"], rel=5e-3)
        assert number(line["B UNet step ms"]) == pytest.approx(m["unet_step_ms"]["median"], rel=5e-3)
        assert number(line["B img/s"]) == pytest.approx(m["images_per_s"]["median"], rel=5e-3)
        cost = prices["new"] / 3600 / m["images_per_s"]["median"]
        assert number(line["B $/image"]) == pytest.approx(cost, rel=5e-3)
        if case not in base:  # the baseline (A) did not measure int8: its cells and the speedups are blank
            assert [line[k] for k in line if k.startswith("A ") or "speedup" in k] == ["—"] * 6
            continue
        b = base[case]["metrics"]
        speedup = b["end_to_end_s"]["median"] / m["end_to_end_s"]["median"]
        assert number(line["B speedup"]) == pytest.approx(speedup, abs=5e-3)
        unet = b["unet_step_ms"]["median"] / m["unet_step_ms"]["median"]
        assert number(line["B UNet speedup"]) == pytest.approx(unet, abs=5e-3)
        assert number(line["A end to end s"]) == pytest.approx(b["end_to_end_s"]["median"], rel=5e-3)
        assert number(line["A img/s"]) == pytest.approx(b["images_per_s"]["median"], rel=5e-3)
        cost = prices["old"] / 3600 / b["images_per_s"]["median"]
        assert number(line["A $/image"]) == pytest.approx(cost, rel=5e-3)
    # Spelled out for one line: 60 s / 25 s; 2000 ms / 800 ms; $1.08/h at 1/25 img/s.
    assert (lines[SDRT]["B speedup"], lines[SDRT]["B UNet speedup"], lines[SDRT]["B $/image"]) == (
        "2.40x",
        "2.50x",
        "$0.00750",
    )
    assert "A speedup" not in lines[SDRT]  # the baseline has no speedup columns
    # Images/s is the row's, not 1 / end to end: batch 2 at 45 s is 4.0 img/s as measured.
    assert lines[BATCH2]["B img/s"] == "4" and lines[BATCH2]["A img/s"] == "1.6"


def test_devices_legend_names_baseline_prices_and_superseded_runs(two_devices, tmp_path):
    files, _, _ = two_devices
    md, _, _ = write_report(files, tmp_path / "out", baseline="9r14", prices=["9R14=1.08"])
    text = md.read_text()
    (legend,) = [t for t in tables(text) if t and "runs superseded" in t[0]]
    assert [(d[""], d["device"], d["key"], d["$/hour"], d["cases"], d["runs superseded"]) for d in legend] == [
        ("A (baseline)", device_label(NEW), f"`{device_key(NEW)}`", "1.08", "4", "2"),
        ("B", device_label(OLD), f"`{device_key(OLD)}`", "—", "3", "0"),
    ]
    lines = comparison_lines(text)
    assert lines[SDRT]["B speedup"] == "0.42x"  # 25 s / 60 s: the old machine against the new baseline
    assert "B $/image" not in lines[SDRT] and lines[SDRT]["A $/image"] == "$0.00750"  # only the new one is priced
    assert "latest row" in text and "superseded" in text


def test_chart_draws_a_bar_per_device_and_case_of_the_rows_latency(two_devices, tmp_path, monkeypatch):
    files, old, new = two_devices
    from sdrt.benchmarks.report import load_rows

    cmp = compare(load_rows(files), baseline=device_key(OLD))
    figures = []
    monkeypatch.setattr(matplotlib.pyplot, "close", figures.append)  # keep the figure to inspect its bars
    drawn = compare_chart(cmp, tmp_path / COMPARE_CHART)
    want = {
        (SDRT, device_key(OLD)): old[0],
        (DIFFUSERS, device_key(OLD)): old[1],
        (BATCH2, device_key(OLD)): old[2],
        (SDRT, device_key(NEW)): new[1],
        (DIFFUSERS, device_key(NEW)): new[3],
        (INT8, device_key(NEW)): new[4],
        (BATCH2, device_key(NEW)): new[5],
    }
    assert {(b["case"], b["device"]): b["end_to_end_s"] for b in drawn} == {
        k: r["metrics"]["end_to_end_s"]["median"] for k, r in want.items()
    }
    labels = {(b["case"], b["device"]): b["label"] for b in drawn}
    assert labels[(SDRT, device_key(NEW))] == "B 25 s · 2.40x vs A"
    assert labels[(INT8, device_key(NEW))] == "B 20 s · — vs A"
    assert labels[(SDRT, device_key(OLD))] == "A 60 s · baseline"
    # The figure itself: the bars' lengths, grouped by case (the tick the bar sits beside), coloured by device.
    (fig,) = figures
    (ax,) = fig.axes
    ticks = [t.get_text().replace("\n", " · ", 1) for t in ax.get_yticklabels()]
    assert ticks == [str(c) for c in cmp.cases] and len(ticks) == 4
    bars = [p for p in ax.patches if p.get_width() > 0]
    assert len(bars) == len(want)
    seen = {}
    for bar in bars:
        case = ticks[round(bar.get_y() + bar.get_height() / 2)]
        device = device_key(OLD) if bar.get_facecolor() == bars[0].get_facecolor() else device_key(NEW)
        seen[(case, device)] = bar.get_width()
    assert seen == {k: r["metrics"]["end_to_end_s"]["median"] for k, r in want.items()}
    texts = {t.get_text().strip() for t in ax.texts}
    assert set(labels.values()) <= texts
    assert (tmp_path / COMPARE_CHART).stat().st_size > 10_000


def test_cli_prints_the_comparison_with_speedups_and_costs(two_devices, tmp_path, capsys):
    files, _, _ = two_devices
    out = tmp_path / "report"
    code = main(
        ["bench", "report", *map(str, files), "--out", str(out), "--baseline", "AVX2", "--price", "9r14=1.08"]
        + ["--price", f"{device_key(OLD)}=0.36"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    lines = comparison_lines(printed)
    assert (lines[SDRT]["A end to end s"], lines[SDRT]["B end to end s"], lines[SDRT]["B speedup"]) == (
        "60",
        "25",
        "2.40x",
    )
    assert (lines[SDRT]["A $/image"], lines[SDRT]["B $/image"]) == ("$0.00600", "$0.00750")  # 0.36/3600*60
    assert (out / "report.md").is_file() and (out / "report.png").is_file() and (out / COMPARE_CHART).is_file()
    text = (out / "report.md").read_text()
    assert comparison_lines(text) == lines and f"![device comparison]({COMPARE_CHART})" in text
    assert "device · implementation · precision" in text  # the per-row table stays


def test_device_names_that_match_none_or_several_are_errors_listing_the_devices(two_devices, tmp_path):
    files, old, new = two_devices
    gpu = tmp_path / "gpu.jsonl"
    gpu.write_text(json.dumps(row(GPU, "sdrt", "tensorrt", "fp16", e2e=2.0)) + "\n")
    files = [*files, gpu]
    with pytest.raises(InputError, match="--baseline 'EPYC': expected one device, it matches 2") as e:
        write_report(files, tmp_path / "a", baseline="EPYC")
    with pytest.raises(InputError, match="--baseline 'h100': expected a device of these rows, none matches") as f:
        write_report(files, tmp_path / "b", baseline="h100")
    for error in (e, f):
        for device in (OLD, NEW, GPU):
            assert device_key(device) in str(error.value) and device_label(device) in str(error.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before writing
    with pytest.raises(InputError, match="--price 'epyc': expected one device"):
        write_report(files, tmp_path / "c", prices=["epyc=1"])
    with pytest.raises(InputError, match="expected DEVICE=USD_PER_HOUR"):
        write_report(files, tmp_path / "c", prices=["L4:0.8"])
    with pytest.raises(InputError, match="expected DEVICE=USD_PER_HOUR"):
        write_report(files, tmp_path / "c", prices=["L4=cheap"])
    with pytest.raises(InputError, match="of 0 or more"):
        write_report(files, tmp_path / "c", prices=["L4=-1"])
    with pytest.raises(InputError, match="one price per device, got two"):
        write_report(files, tmp_path / "c", prices=["L4=0.8", "nvidia=0.9"])
    with pytest.raises(InputError, match="expected a device, got an empty name"):
        write_report(files, tmp_path / "c", baseline=" ")
    # A full key or label picks its device even where it is part of another's; by default, the first file's.
    from sdrt.benchmarks.report import load_rows

    rows = load_rows(files)
    assert compare(rows, baseline=device_label(GPU).upper()).baseline == device_key(GPU)
    assert compare(rows).devices == [device_key(OLD), device_key(NEW), device_key(GPU)]
    assert compare(rows, baseline="l4").devices == [device_key(GPU), device_key(OLD), device_key(NEW)]


def test_one_device_and_rows_without_unet_or_model_still_compare():
    """A single machine's file: its own column, no speedup columns; rows lacking fields show —."""
    bare = row(GPU, "sdrt", "tensorrt", "fp16", e2e=2.0)
    del bare["model"], bare["metrics"]["unet_step_ms"], bare["timestamp"], bare["guidance_scale"]
    (line,) = tables(comparison_table(compare([bare, {**bare, "schema": 1, "guidance_scale": 1.0}])))
    head = ["case", "A end to end s", "A UNet step ms", "A img/s"]
    assert [list(x) for x in line] == [head, head]
    assert [x["case"] for x in line] == [
        "b1 256x256 25 steps cfg 1 · sdrt/tensorrt · fp16",  # another guidance scale: another case
        "b1 256x256 25 steps · sdrt/tensorrt · fp16",
    ]
    assert [x["A end to end s"] for x in line] == ["2", "2"] and line[1]["A UNet step ms"] == "—"
