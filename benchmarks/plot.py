"""Render the benchmark CSVs as PNG charts.

    python benchmarks/plot.py benchmarks/results/cpu/bench_models.csv [--out chart.png]
    python benchmarks/plot.py benchmarks/results/cpu/bench_blocks.csv [--out DIR]

Reads the CSV only (no torch, no resnet_kernels), so results copied from another machine can be
plotted anywhere; the kind of CSV is told by its columns.

bench_models.csv: one chart, speedup vs eager NCHW per model and provider. Each bar is
median(eager_nchw) / median(provider); the whiskers span median(eager_nchw) / p80 ..
median(eager_nchw) / p20 of that provider, and the label above a bar is the provider's median
time per batch in ms.

bench_blocks.csv: per dtype, two charts with one panel per batch x memory format:
bench_blocks_speedup_<dtype>.png (per shape, each provider's speedup vs eager in the same memory
format; log scale: on CPU the paired speedup, median and p20..p80 over interleaved rounds of
eager's time / the provider's; on GPU median(eager) / median, whiskers from the provider's p80..p20) and
bench_blocks_roofline_<dtype>.png (per shape, each provider's % of the roofline floor measured in
the same run; 100% = at the roofline). Hatched bars: timed while other processes took the cores.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

PROVIDER_ORDER = ("eager_nchw", "eager_channels_last", "compile", "resnet_kernels")
COLORS = {"eager_nchw": "#9e9e9e", "eager_channels_last": "#5c8fbf", "compile": "#e0a030",
          "resnet_kernels": "#2e9e5b"}


def read_rows(csv_path):
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{csv_path}: no rows")
    missing = {"model", "provider", "median_ms", "p20_ms", "p80_ms", "speedup_vs_eager"} - set(rows[0])
    if missing:
        raise SystemExit(f"{csv_path}: missing columns {sorted(missing)}")
    return rows


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot_csv(csv_path, png_path=None):
    """Write the chart for csv_path to png_path (default: next to the CSV, .png); return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    png_path = Path(png_path) if png_path else csv_path.with_suffix(".png")
    rows = read_rows(csv_path)
    models = list(dict.fromkeys(r["model"] for r in rows))
    present = {r["provider"] for r in rows}
    providers = [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))
    by_key = {(r["model"], r["provider"]): r for r in rows}

    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 2.2 * len(models)), 4.8))
    top = 1.0
    for i, prov in enumerate(providers):
        xs, heights, errs_lo, errs_hi, labels = [], [], [], [], []
        for j, model in enumerate(models):
            r = by_key.get((model, prov))
            base = by_key.get((model, "eager_nchw"))
            speed, med = _float(r and r["speedup_vs_eager"]), _float(r and r["median_ms"])
            if speed is None or med is None:
                continue
            base_med = _float(base["median_ms"]) if base else None
            p20, p80 = _float(r["p20_ms"]), _float(r["p80_ms"])
            lo = hi = 0.0
            if base_med and p20 and p80:
                lo, hi = max(speed - base_med / p80, 0.0), max(base_med / p20 - speed, 0.0)
            xs.append(j + (i - (len(providers) - 1) / 2) * width)
            heights.append(speed)
            errs_lo.append(lo)
            errs_hi.append(hi)
            labels.append(f"{med:.0f} ms" if med >= 10 else f"{med:.2f} ms")
            top = max(top, speed + hi)
        if not xs:
            continue
        bars = ax.bar(xs, heights, width * 0.92, yerr=[errs_lo, errs_hi], capsize=3, label=prov,
                      color=COLORS.get(prov), edgecolor="black", linewidth=0.5, error_kw={"linewidth": 0.8})
        for bar, text, hi in zip(bars, labels, errs_hi):
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height() + hi), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models)
    ax.set_ylabel("speedup vs eager NCHW (median)")
    ax.set_ylim(0, top * 1.45)
    first = rows[0]
    ax.set_title(f"{first.get('device_name', '?')} ({first.get('device', '?')}), {first.get('threads', '?')} threads, "
                 f"{first.get('dtype', '?')}, batch {first.get('batch', '?')} x {first.get('size', '?')}px\n"
                 f"torch {first.get('torch_version', '?')}, resnet_kernels {first.get('resnet_kernels_version', '?')}, "
                 f"commit {first.get('git_commit', '?')}, {first.get('timestamp', '')}", fontsize=8)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.text(0.01, 0.01, "bars: median speedup; whiskers: p20..p80; labels: median ms per batch",
             fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=130)
    plt.close(fig)
    return png_path


# --------------------------------------------------------------------------------------- bench_blocks.csv
BLOCK_PROVIDER_ORDER = ("eager", "conv_alone", "compile", "compile_max_autotune", "torch", "triton", "cuda", "auto")
BLOCK_COLORS = {"eager": "#9e9e9e", "conv_alone": "#d0d0d0", "compile": "#e0a030", "compile_max_autotune": "#b5651d",
                "torch": "#5c8fbf", "triton": "#8e6bbf", "cuda": "#c0504d", "auto": "#2e9e5b"}


CONTENDED_SHARE = 0.85  # bench_blocks.py --quiet-share's default


def is_blocks_csv(rows):
    return bool(rows) and {"op", "shape", "provider", "memory_format", "pct_roofline"} <= set(rows[0])


def _block_groups(rows):
    """{dtype: {(batch, memory_format): [ok rows]}} in the CSV's order."""
    out = {}
    for r in rows:
        if r.get("status") != "ok" or _float(r.get("median_ms")) is None:
            continue
        out.setdefault(r["dtype"], {}).setdefault((r["batch"], r["memory_format"]), []).append(r)
    return out


def _block_panels(rows, png_path, metric, ylabel, title, providers_filter, log=False, ref_line=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(rows.items())
    shapes = list(dict.fromkeys(r["shape"] for _, rs in groups for r in rs))
    present = {r["provider"] for _, rs in groups for r in rs}
    providers = [p for p in BLOCK_PROVIDER_ORDER if p in present and providers_filter(p)] + \
        sorted(p for p in present - set(BLOCK_PROVIDER_ORDER) if providers_filter(p))
    from matplotlib.ticker import FuncFormatter, NullFormatter

    width = 0.8 / max(len(providers), 1)
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(8.0, 1.0 + 0.55 * len(shapes) * max(len(providers), 2) / 3),
                                                      3.6 * len(groups) + 1.2), squeeze=False)
    any_busy = False
    for ax, ((batch, fmt), rs) in zip(axes[:, 0], groups):
        by = {(r["shape"], r["provider"]): r for r in rs}
        lows, tops = [], []
        for i, prov in enumerate(providers):
            xs, hs, lo, hi, busy = [], [], [], [], []
            for j, s in enumerate(shapes):
                r = by.get((s, prov))
                v = metric(r, by.get((s, "eager"))) if r else None
                if v is None:
                    continue
                share = _float(r.get("cpu_share"))
                busy.append(share is not None and share < CONTENDED_SHARE)
                xs.append(j + (i - (len(providers) - 1) / 2) * width)
                hs.append(v[0])
                lo.append(max(v[0] - v[1], 0.0))
                hi.append(max(v[2] - v[0], 0.0))
            if xs:
                bars = ax.bar(xs, hs, width * 0.92, yerr=[lo, hi], capsize=2, label=prov,
                              color=BLOCK_COLORS.get(prov), edgecolor="black", linewidth=0.4,
                              error_kw={"linewidth": 0.6})
                for bar, b in zip(bars, busy):
                    if b:
                        bar.set_hatch("///")
                        any_busy = True
                lows += [h - d for h, d in zip(hs, lo)]
                tops += [h + d for h, d in zip(hs, hi)]
        if ref_line is not None:
            ax.axhline(ref_line, color="black", linewidth=0.8, linestyle="--")
        if log:
            ax.set_yscale("log", base=2)
            bottom = min([ref_line or 1.0] + [v for v in lows if v > 0])
            ax.set_ylim(bottom / 1.4, max([ref_line or 1.0] + tops) * 2.2)  # headroom for the legend
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        elif tops:
            ax.set_ylim(0, max(tops) * 1.3)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=35, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(shapes) - 0.4)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(f"batch {batch}, {fmt}", fontsize=9)
        ax.grid(axis="y", linewidth=0.3, alpha=0.6)
        ax.legend(fontsize=7, ncol=min(len(providers), 8), loc="upper left")
    first = next(r for _, rs in groups for r in rs)
    fig.suptitle(f"{title}: {first.get('device_name', '?')} ({first.get('device', '?')}), "
                 f"{first.get('threads', '?')} threads, {first.get('dtype', '?')}\n"
                 f"torch {first.get('torch_version', '?')}, triton {first.get('triton_version', '?')}, "
                 f"resnet_kernels {first.get('resnet_kernels_version', '?')}, commit {first.get('git_commit', '?')}, "
                 f"{first.get('timestamp', '')}", fontsize=8)
    if any_busy:
        fig.text(0.01, 0.002, f"hatched: timed while other processes took the cores (CPU share < {CONTENDED_SHARE}); "
                 "an upper bound on the time", fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.01 if any_busy else 0, 1, 1))
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def _speedup(r, eager):
    """(speedup, low, high) vs eager in the same panel: the paired speedup (median and p20/p80 over
    interleaved rounds of eager's time / the provider's) where the CSV has it (CPU), else
    median(eager) / median(provider) with whiskers median(eager) / p80 .. / p20."""
    paired = [_float(r.get(k)) for k in ("speedup_paired", "speedup_paired_p20", "speedup_paired_p80")]
    if None not in paired:
        return tuple(paired)
    sp, e = _float(r.get("speedup_vs_eager")), _float(eager.get("median_ms")) if eager else None
    p20, p80 = _float(r.get("p20_ms")), _float(r.get("p80_ms"))
    if sp is None:
        return None
    if e and p20 and p80:
        return sp, e / p80, e / p20
    return sp, sp, sp


def _roofline(r, eager):
    pct = _float(r.get("pct_roofline"))
    if pct is None:
        return None
    med, p20, p80 = (_float(r.get(k)) for k in ("median_ms", "p20_ms", "p80_ms"))
    if med and p20 and p80:
        return pct, pct * med / p80, pct * med / p20
    return pct, pct, pct


def plot_blocks_csv(csv_path, out_dir=None):
    """Write the bench_blocks charts for csv_path into out_dir (default: the CSV's folder); return the paths."""
    csv_path = Path(csv_path)
    out_dir = Path(out_dir) if out_dir else csv_path.parent
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not is_blocks_csv(rows):
        raise SystemExit(f"{csv_path}: not a bench_blocks CSV (needs op, shape, provider, memory_format, pct_roofline)")
    written = []
    for dtype, groups in _block_groups(rows).items():
        written.append(_block_panels(groups, out_dir / f"bench_blocks_speedup_{dtype}.png", _speedup,
                                     "speedup vs eager (whiskers p20-p80)",
                                     "speedup vs eager per shape (conv_bn_act ops, whole blocks)",
                                     lambda p: p not in ("eager", "conv_alone"), log=True, ref_line=1.0))
        written.append(_block_panels(groups, out_dir / f"bench_blocks_roofline_{dtype}.png", _roofline,
                                     "% of roofline floor",
                                     "% of the roofline per shape (ceilings measured in the run)",
                                     lambda p: True))
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path, help="bench_models.csv (benchmarks/bench_models.py) or bench_blocks.csv "
                                          "(benchmarks/bench_blocks.py)")
    p.add_argument("--out", type=Path, default=None,
                   help="bench_models: PNG path (default: the CSV's path with .png); bench_blocks: output folder "
                        "(default: the CSV's folder)")
    args = p.parse_args(argv)
    with open(args.csv, newline="") as f:
        header = next(csv.reader(f), [])
    if {"op", "shape", "memory_format", "pct_roofline"} <= set(header):
        for path in plot_blocks_csv(args.csv, args.out):
            print(path)
    else:
        print(plot_csv(args.csv, args.out))


if __name__ == "__main__":
    main()
