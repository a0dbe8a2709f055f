"""Render bench_models.csv as a bar chart: speedup vs eager NCHW per model and provider.

    python benchmarks/plot.py benchmarks/results/cpu/bench_models.csv [--out chart.png]

Reads the CSV only (no torch, no resnet_kernels), so results copied from another machine can be
plotted anywhere. Each bar is median(eager_nchw) / median(provider); the whiskers span
median(eager_nchw) / p80 .. median(eager_nchw) / p20 of that provider, and the label above a bar
is the provider's median time per batch in ms.
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path, help="bench_models.csv written by benchmarks/bench_models.py")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: the CSV's path with .png)")
    args = p.parse_args(argv)
    print(plot_csv(args.csv, args.out))


if __name__ == "__main__":
    main()
