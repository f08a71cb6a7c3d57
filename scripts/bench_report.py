#!/usr/bin/env python
"""Turn pytest-benchmark JSON files into markdown tables and a speedup-vs-batch plot.

    pytest bench --benchmark-only --benchmark-json=out/bench/bench.json
    python scripts/bench_report.py out/bench/*.json \\
        [--out docs/benchmarks-generated.md] [--plot docs/img/speedup_vs_batch.png | --no-plot]

Reads the suites under ``bench/``: the GPU kernel suite (``extra_info["suite"] ==
"gpu_groupwise_int"``: quantlab vs cuBLAS vs ``_weight_int4pack_mm``, and the previous kernels
``quantlab-v1`` where measured; ``"gpu_bandwidth"``: the device-to-device copy bandwidth of the
same run, which the kernels' TB/s are shown against), the CPU kernel suite
(``test_cpu_groupwise_int``: kernel vs dequant + mm vs dense fp32), the decode suite
(``extra_info["suite"] == "decode"``), and lists anything else under "Other benchmarks". One table
per device. A baseline that did not run (fp16 or W8 for int4pack, a skipped or failed test) shows
as "–". When several files hold the same measurement, the newest run (its ``datetime``) wins.

The plot (matplotlib, optional) draws quantlab's speedup over cuBLAS against the batch size per
shape, one panel per GPU and dtype, plus the CPU kernel's speedup over dense fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DEFAULT_MD = Path("docs/benchmarks-generated.md")
DEFAULT_PLOT = Path("docs/img/speedup_vs_batch.png")
MISSING = "–"

GPU_VARIANTS = ("quantlab", "cublas", "int4pack", "quantlab-v1")
CPU_VARIANTS = ("kernel", "dequant+matmul", "dense fp32")


@dataclass
class Run:
    """One pytest-benchmark JSON file."""

    path: Path
    date: str
    commit: str
    torch: str
    machine: str
    benchmarks: list[dict[str, Any]]


@dataclass
class Entry:
    """One benchmark, placed in a table: ``table`` -> ``device`` -> ``key`` -> ``variant``."""

    table: str
    device: str
    key: tuple[Any, ...]
    variant: str
    seconds: float
    info: dict[str, Any]
    bench: dict[str, Any]
    run: Run


@dataclass
class Report:
    runs: list[Run]
    # table -> device -> key -> variant -> entry (insertion order = first appearance)
    tables: dict[str, dict[str, dict[tuple[Any, ...], dict[str, Entry]]]] = field(
        default_factory=dict
    )

    def rows(self, table: str) -> dict[str, dict[tuple[Any, ...], dict[str, Entry]]]:
        return self.tables.get(table, {})


# ---------------------------------------------------------------------------------------------
# Loading


def _cpu_name(machine_info: dict[str, Any]) -> str:
    cpu = machine_info.get("cpu") or {}
    brand = cpu.get("brand_raw") or machine_info.get("processor") or machine_info.get("machine")
    count = cpu.get("count")
    name = str(brand or "unknown CPU")
    return f"{name} ({count} CPUs)" if count else name


def _commit(data: dict[str, Any], infos: Iterable[dict[str, Any]]) -> str:
    recorded = sorted({str(i["commit"]) for i in infos if i.get("commit")})
    commit_info = data.get("commit_info") or {}
    if recorded:
        commit = ", ".join(recorded)
    elif commit_info.get("id"):
        commit = str(commit_info["id"])[:7]
    else:
        return "unknown"
    if commit_info.get("dirty"):
        commit += " (dirty)"
    return commit


def load_run(path: Path) -> Run:
    data = json.loads(path.read_text(encoding="utf-8"))
    benchmarks = [b for b in data.get("benchmarks", []) if isinstance(b, dict)]
    infos = [b.get("extra_info") or {} for b in benchmarks]
    torches = sorted({str(i["torch"]) for i in infos if i.get("torch")})
    return Run(
        path=path,
        date=str(data.get("datetime") or ""),
        commit=_commit(data, infos),
        torch=", ".join(torches) or "not recorded",
        machine=_cpu_name(data.get("machine_info") or {}),
        benchmarks=benchmarks,
    )


def _median(bench: dict[str, Any]) -> float | None:
    value = (bench.get("stats") or {}).get("median")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _classify(bench: dict[str, Any], run: Run) -> Entry | None:
    info = bench.get("extra_info") or {}
    params = bench.get("params") or {}
    fullname = str(bench.get("fullname") or bench.get("name") or "")
    suite = info.get("suite")
    seconds = info.get("time_s")
    seconds = float(seconds) if isinstance(seconds, (int, float)) and seconds > 0 else None
    seconds = seconds or _median(bench)
    if seconds is None:
        return None
    if suite == "gpu_groupwise_int":
        key = (info.get("case"), int(info.get("m", 0)), info.get("dtype"))
        device = str(info.get("device") or "unknown GPU")
        return Entry("gpu", device, key, str(info.get("variant")), seconds, info, bench, run)
    if suite == "gpu_bandwidth":
        device = str(info.get("device") or "unknown GPU")
        return Entry("gpu_bw", device, ("copy",), "copy", seconds, info, bench, run)
    if suite == "decode":
        variant = "float" if info.get("variant") == "float" else "quantized"
        key = (info.get("model"), info.get("dtype"), int(info.get("batch", 0)))
        # A CPU run is named like the CPU kernel suite's, so that both land under one machine.
        on_gpu = info.get("device_type") == "cuda"
        device = str(info.get("device") or run.machine) if on_gpu else run.machine
        return Entry("decode", device, key, variant, seconds, info, bench, run)
    if "test_cpu_groupwise_int" in fullname or (
        info.get("variant") in CPU_VARIANTS and "layer" in params
    ):
        key = (params.get("layer"), int(params.get("m", 0)))
        variant = str(info.get("variant"))
        return Entry("cpu", run.machine, key, variant, seconds, info, bench, run)
    key = (str(bench.get("group") or ""), str(bench.get("name") or fullname))
    return Entry("other", run.machine, key, "", seconds, info, bench, run)


def build_report(paths: Sequence[Path]) -> Report:
    runs = [load_run(p) for p in paths]
    # Oldest first, so that a newer measurement of the same thing overwrites an older one.
    report = Report(runs=sorted(runs, key=lambda r: r.date))
    for run in report.runs:
        for bench in run.benchmarks:
            entry = _classify(bench, run)
            if entry is None:
                continue
            device_rows = report.tables.setdefault(entry.table, {}).setdefault(entry.device, {})
            device_rows.setdefault(entry.key, {})[entry.variant] = entry
    return report


# ---------------------------------------------------------------------------------------------
# Markdown


def _num(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        return MISSING
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _ratio(baseline: Entry | None, ours: Entry | None) -> str:
    if baseline is None or ours is None:
        return MISSING
    return f"{baseline.seconds / ours.seconds:.2f}x"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _runs_line(entries: Iterable[Entry]) -> str:
    runs: dict[Path, Run] = {}
    for e in entries:
        runs.setdefault(e.run.path, e.run)
    parts = [f"`{r.path}` ({_date(r)}, commit {r.commit})" for r in runs.values()]
    return "From " + "; ".join(parts) + "."


def _date(run: Run) -> str:
    return f"{run.date[:16].replace('T', ' ')} UTC" if run.date else "date not recorded"


def _distinct(entries: Iterable[Entry], field_name: str) -> str:
    values = sorted({str(e.info[field_name]) for e in entries if e.info.get(field_name)})
    return ", ".join(values) or "not recorded"


def _all_entries(rows: dict[tuple[Any, ...], dict[str, Entry]]) -> list[Entry]:
    return [e for variants in rows.values() for e in variants.values()]


def _copy_tb_s(report: Report, device: str) -> float | None:
    """The device-to-device copy bandwidth measured on ``device`` (read + write), if any."""
    entry = report.rows("gpu_bw").get(device, {}).get(("copy",), {}).get("copy")
    value = entry.info.get("TB/s") if entry else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _percent(value: float | None, ceiling: float | None) -> str:
    if value is None or ceiling is None:
        return MISSING
    return f"{100 * value / ceiling:.0f}%"


def _gpu_sections(report: Report) -> list[str]:
    lines: list[str] = []
    for device, rows in report.rows("gpu").items():
        entries = _all_entries(rows)
        copy_bw = _copy_tb_s(report, device)
        l2 = _distinct(entries, "l2_bytes")
        l2_text = f"{int(l2) / 2**20:.0f} MiB" if l2.isdigit() else l2
        lines += [
            f"## GPU kernel: {device}",
            "",
            f"torch {_distinct(entries, 'torch')} (CUDA {_distinct(entries, 'cuda')}), "
            f"{_distinct(entries, 'capability')}, L2 {l2_text}, timing "
            f"{_distinct(entries, 'timing')}. {_runs_line(entries)}",
            "",
            "Median time per call in microseconds (CUDA events, weights rotated over at least "
            "2 x L2 bytes). Speedup = baseline time / quantlab time; TB/s = bytes of packed "
            "weight + scales + zeros per call / quantlab time; int4pack = "
            "`torch.ops.aten._weight_int4pack_mm` (bf16, W4 only); v1 = quantlab's previous "
            "kernels on the exported layout (full runs only). "
            + (
                f"Device-to-device copy bandwidth measured in the same run: {copy_bw:.2f} TB/s "
                '(bytes read + written); "% of copy" = quantlab TB/s over it.'
                if copy_bw
                else "No copy-bandwidth probe in these runs."
            ),
            "",
        ]
        ordered = sorted(
            rows.items(),
            key=lambda kv: (_first_index(rows, kv[0][0]), str(kv[0][2]), kv[0][1]),
        )
        body = []
        for (case, m, dtype), variants in ordered:
            q, c, t, v1 = (variants.get(v) for v in GPU_VARIANTS)
            any_entry = q or c or t or v1
            assert any_entry is not None
            layer = str(any_entry.info.get("layer") or case)
            bits, group = any_entry.info.get("bits"), any_entry.info.get("group")
            body.append(
                [
                    layer,
                    f"W{bits} g{group}",
                    str(m),
                    str(dtype),
                    _num(q.seconds * 1e6) if q else MISSING,
                    _num(c.seconds * 1e6) if c else MISSING,
                    _num(t.seconds * 1e6) if t else MISSING,
                    _ratio(c, q),
                    _ratio(t, q),
                    _num(_tb_s(q)),
                    _num(_tb_s(c)),
                    _num(_tflops(q)),
                    str(q.info.get("path", MISSING)) if q else MISSING,
                    _percent(_tb_s(q), copy_bw),
                    _num(v1.seconds * 1e6) if v1 else MISSING,
                    _ratio(v1, q),
                ]
            )
        lines += _table(
            [
                "shape",
                "weights",
                "M",
                "dtype",
                "quantlab µs",
                "cuBLAS µs",
                "int4pack µs",
                "vs cuBLAS",
                "vs int4pack",
                "quantlab TB/s",
                "cuBLAS TB/s",
                "quantlab TFLOP/s",
                "path",
                "% of copy",
                "v1 µs",
                "vs v1",
            ],
            body,
        )
        lines.append("")
    return lines


def _first_index(rows: dict[tuple[Any, ...], Any], case: Any) -> int:
    for i, key in enumerate(rows):
        if key[0] == case:
            return i
    return len(rows)


def _tflops(entry: Entry | None) -> float | None:
    if entry is None:
        return None
    try:
        m, n, k = (int(entry.info[name]) for name in ("m", "n", "k"))
    except (KeyError, TypeError, ValueError):
        return None
    return 2 * m * n * k / entry.seconds / 1e12


def _tb_s(entry: Entry | None) -> float | None:
    if entry is None or not entry.info.get("weight_bytes"):
        return None
    return float(entry.info["weight_bytes"]) / entry.seconds / 1e12


def _cpu_bytes(entry: Entry | None) -> float | None:
    """Weight bytes per call, recovered from the suite's GB/s (computed from the minimum time)."""
    if entry is None:
        return None
    gbps = entry.info.get("weight GB/s")
    minimum = (entry.bench.get("stats") or {}).get("min")
    if not isinstance(gbps, (int, float)) or not isinstance(minimum, (int, float)):
        return None
    return gbps * 1e9 * minimum


def _cpu_sections(report: Report) -> list[str]:
    lines: list[str] = []
    for device, rows in report.rows("cpu").items():
        entries = _all_entries(rows)
        lines += [
            f"## CPU kernel: {device}",
            "",
            f"torch {_torch_of(entries)}. {_runs_line(entries)}",
            "",
            "pytest-benchmark medians in milliseconds. Kernel = "
            "`torch.ops.quantlab.groupwise_int_mm`; dequant + mm = `groupwise_int_dequant` then "
            "`torch.matmul`; dense = fp32 `x @ W.T`. Speedup = baseline time / kernel time; "
            "GB/s = packed weight bytes / kernel time.",
            "",
        ]
        body = []
        for (layer, m), variants in sorted(
            rows.items(), key=lambda kv: (_first_index(rows, kv[0][0]), kv[0][1])
        ):
            k, d, f = (variants.get(v) for v in CPU_VARIANTS)
            weight_bytes = _cpu_bytes(k)
            body.append(
                [
                    str(layer),
                    str(m),
                    _num(k.seconds * 1e3) if k else MISSING,
                    _num(d.seconds * 1e3) if d else MISSING,
                    _num(f.seconds * 1e3) if f else MISSING,
                    _ratio(f, k),
                    _ratio(d, k),
                    _num(weight_bytes / k.seconds / 1e9) if k and weight_bytes else MISSING,
                    str(k.info.get("backend", MISSING)) if k else MISSING,
                ]
            )
        lines += _table(
            [
                "shape, group",
                "M",
                "kernel ms",
                "dequant + mm ms",
                "dense fp32 ms",
                "vs dense",
                "vs dequant + mm",
                "kernel GB/s",
                "backend",
            ],
            body,
        )
        lines.append("")
    return lines


def _torch_of(entries: list[Entry]) -> str:
    recorded = _distinct(entries, "torch")
    if recorded != "not recorded":
        return recorded
    # Suites that do not record it: take what the rest of the same run recorded.
    runs = {e.run.path: e.run for e in entries}
    return ", ".join(sorted({r.torch for r in runs.values()}))


def _decode_sections(report: Report) -> list[str]:
    lines: list[str] = []
    for device, rows in report.rows("decode").items():
        entries = _all_entries(rows)
        quantized = sorted({str(e.info.get("variant")) for e in entries if e.variant != "float"})
        qname = ", ".join(quantized) or "quantized"
        lines += [
            f"## End-to-end decode: {device}",
            "",
            f"torch {_torch_of(entries)}. {_runs_line(entries)}",
            "",
            "Greedy decode with a KV cache, prefill excluded; tokens/s counts every sequence of "
            "the batch (pytest-benchmark medians).",
            "",
        ]
        body = []
        for (model, dtype, batch), variants in rows.items():
            f, q = variants.get("float"), variants.get("quantized")
            any_entry = f or q
            assert any_entry is not None
            body.append(
                [
                    str(model),
                    str(dtype),
                    str(batch),
                    str(any_entry.info.get("new_tokens", MISSING)),
                    _num(f.info.get("tokens/s")) if f else MISSING,
                    _num(q.info.get("tokens/s")) if q else MISSING,
                    _ratio(f, q),
                    _num(f.info.get("prefill_ms")) if f else MISSING,
                    _num(q.info.get("prefill_ms")) if q else MISSING,
                ]
            )
        lines += _table(
            [
                "model",
                "dtype",
                "batch",
                "new tokens",
                "float tok/s",
                f"{qname} tok/s",
                "speedup",
                "float prefill ms",
                f"{qname} prefill ms",
            ],
            body,
        )
        lines.append("")
    return lines


def _other_sections(report: Report) -> list[str]:
    rows = report.rows("other")
    if not rows:
        return []
    lines = ["## Other benchmarks", "", "pytest-benchmark medians.", ""]
    body = []
    for device, device_rows in rows.items():
        for (group, name), variants in device_rows.items():
            e = variants[""]
            body.append([group or MISSING, name, device, _seconds_text(e.seconds)])
    return lines + _table(["group", "benchmark", "machine", "median"], body) + [""]


def _seconds_text(seconds: float) -> str:
    if seconds >= 1:
        return f"{_num(seconds)} s"
    if seconds >= 1e-3:
        return f"{_num(seconds * 1e3)} ms"
    return f"{_num(seconds * 1e6)} µs"


def render_markdown(report: Report, plot: Path | None = None, md_path: Path | None = None) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks (generated)",
        "",
        f"Written by `scripts/bench_report.py` on {now}; do not edit by hand (the curated figures "
        "and their reading are in `docs/benchmarks.md`). Baselines ran in the same process as "
        "the kernel they are compared with.",
        "",
    ]
    lines += _table(
        ["JSON", "date", "commit", "torch", "machine", "benchmarks"],
        (
            [
                f"`{r.path}`",
                _date(r),
                r.commit,
                r.torch,
                r.machine,
                str(len(r.benchmarks)),
            ]
            for r in report.runs
        ),
    )
    lines.append("")
    if plot is not None:
        target = plot
        if md_path is not None:
            try:
                target = plot.resolve().relative_to(md_path.resolve().parent)
            except ValueError:
                target = plot.resolve()
        lines += [f"![speedup vs batch size]({target.as_posix()})", ""]
    sections = (
        _gpu_sections(report)
        + _cpu_sections(report)
        + _decode_sections(report)
        + _other_sections(report)
    )
    if not sections:
        sections = ["No benchmarks found in the input files.", ""]
    return "\n".join(lines + sections).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# Plot


def _plot_panels(report: Report) -> list[tuple[str, str, dict[str, list[tuple[int, float]]]]]:
    """``(title, y label, {series: [(batch, speedup)]})`` per panel; only points with a baseline."""
    panels = []
    for device, rows in report.rows("gpu").items():
        by_dtype: dict[str, dict[str, list[tuple[int, float]]]] = {}
        for (case, m, dtype), variants in rows.items():
            q, c = variants.get("quantlab"), variants.get("cublas")
            if q and c:
                series = by_dtype.setdefault(str(dtype), {}).setdefault(str(case), [])
                series.append((m, c.seconds / q.seconds))
        for dtype, series in by_dtype.items():
            panels.append((f"{device}, {dtype}", "speedup vs cuBLAS", series))
    for device, rows in report.rows("cpu").items():
        cpu_series: dict[str, list[tuple[int, float]]] = {}
        for (layer, m), variants in rows.items():
            k, f = variants.get("kernel"), variants.get("dense fp32")
            if k and f:
                cpu_series.setdefault(str(layer), []).append((m, f.seconds / k.seconds))
        if cpu_series:
            panels.append((f"{device}: CPU kernel", "speedup vs dense fp32", cpu_series))
    return panels


def write_plot(report: Report, path: Path) -> bool:
    """Write the PNG; False (with a message) when there is nothing to plot or no matplotlib."""
    panels = _plot_panels(report)
    if not panels:
        print("bench_report: no speedup data to plot", file=sys.stderr)
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_report: matplotlib is not installed; no plot written", file=sys.stderr)
        return False
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.5 * rows), squeeze=False)
    for ax, (title, ylabel, series) in zip(axes.flat, panels, strict=False):
        for name, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        batches = sorted({p[0] for points in series.values() for p in points})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        # From 0, so that a flat 1.0x line does not look like a cliff.
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size M")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_MD, help=f"markdown ({DEFAULT_MD})")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help=f"PNG ({DEFAULT_PLOT})")
    parser.add_argument("--no-plot", action="store_true", help="write the markdown only")
    args = parser.parse_args(argv)
    missing = [p for p in args.json if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(map(str, missing))}")
    report = build_report(args.json)
    plotted = not args.no_plot and write_plot(report, args.plot)
    markdown = render_markdown(report, args.plot if plotted else None, args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown, encoding="utf-8")
    print(f"bench_report: wrote {args.out}" + (f" and {args.plot}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
