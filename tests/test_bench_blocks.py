"""The block benchmark's own logic: shapes derived from torchvision, FLOP/byte counts, the rotating
interleaved CPU timer, per-model totals, and one tiny end-to-end run (CSV + markdown + PNGs)."""
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import common, plot, shapes  # noqa: E402


@pytest.fixture(scope="module")
def derived():
    return shapes.resnet_shapes()


def test_derived_shapes_cover_every_conv_and_match_the_frozen_table(derived):
    assert [(s.key, s.role, s.count) for s in derived] == [(s.key, s.role, s.count) for s in shapes.frozen_shapes()]
    names = [s.name for s in derived]
    assert len(set(names)) == len(names) == 34
    # Every conv of every model is one occurrence of some shape: counts add up to the models' conv counts.
    n_convs = {"resnet18": 20, "resnet34": 36, "resnet50": 53, "resnet101": 104}
    for model, n in n_convs.items():
        assert sum(s.count.get(model, 0) for s in derived) == n
        assert sum(len([w for w in s.where if w.startswith(model + ".")]) for s in derived) == n
    stem = derived[0]
    assert (stem.role, stem.c, stem.k, stem.r, stem.stride, stem.h, stem.p) == ("stem", 3, 64, 7, 2, 224, 112)
    roles = {s.role: (s.relu, s.residual) for s in derived}
    assert roles == {"stem": (True, False), "block_conv": (True, False), "block_last": (True, True),
                     "downsample": (False, False)}
    by = {s.name: s for s in derived}
    assert "resnet50.layer3.0.downsample.0" in by["ds 1x1s2 512->1024 norelu @28"].where
    assert by["last 1x1 256->1024+res @14"].count == {"resnet50": 6, "resnet101": 23}
    assert [s.name for s in shapes.quick_shapes(derived)] == list(shapes.QUICK)


def test_blocks_are_derived_with_their_convs(derived):
    from torch.utils.flop_counter import FlopCounterMode

    blocks = shapes.resnet_blocks()
    assert len(blocks) == 15 and len({b.name for b in blocks}) == 15
    per_model = {"resnet18": 8, "resnet34": 16, "resnet50": 16, "resnet101": 33}
    for model, n in per_model.items():
        assert sum(b.count.get(model, 0) for b in blocks) == n
    assert set(shapes.QUICK_BLOCKS) <= {b.name for b in blocks}
    conv_names = {s.name for s in derived}
    for b in blocks:
        assert all(c.name in conv_names for c in b.convs)
        assert len(b.convs) == {"BasicBlock": 2, "Bottleneck": 3}[b.kind] + int(b.downsample)
        with torch.device("meta"):
            mod = b.build().eval()
        x = torch.empty(2, b.inplanes, b.h, b.h, device="meta")
        with FlopCounterMode(display=False) as fc:
            y = mod(x)
        assert y.shape == (2, b.out, b.p, b.p), b.name
        epilogue = sum(2 * c.k * c.p * c.p * (2 + int(c.residual) + int(c.relu)) for c in b.convs)
        assert b.flops(2) == fc.get_total_flops() + epilogue, b.name
        weights = sum(p.numel() for n, p in mod.named_parameters() if p.dim() == 4)
        assert b.min_bytes(2, 2) == (x.numel() + y.numel() + weights) * 2 + sum(8 * c.k for c in b.convs)


def test_flops_and_bytes_agree_with_torch_counts(derived):
    from torch.utils.flop_counter import FlopCounterMode

    for s in derived:
        n = 2
        x = torch.empty(n, s.c, s.h, s.h, device="meta")
        w = torch.empty(s.k, s.c, s.r, s.r, device="meta")
        with FlopCounterMode(display=False) as fc:
            y = F.conv2d(x, w, None, s.stride, s.padding)
        assert y.shape == (n, s.k, s.p, s.p)
        epilogue = y.numel() * (2 + int(s.residual) + int(s.relu))
        assert s.flops(n) == fc.get_total_flops() + epilogue, s.name
        for esize, dtype in ((4, torch.float32), (2, torch.float16)):
            tensors = [x.to(dtype), w.to(dtype), y.to(dtype)] + ([y.to(dtype)] if s.residual else [])
            want = sum(t.numel() * t.element_size() for t in tensors) + 2 * s.k * 4  # + fp32 scale, shift
            assert s.min_bytes(n, esize) == want, s.name


def test_time_rotating_interleaves_rotates_inputs_and_times(monkeypatch):
    calls = []

    def make(name, sleep):
        def fn(i):
            calls.append((name, i))
            time.sleep(sleep)
        return fn

    fns = {"a": make("a", 0.002), "b": make("b", 0.0), "c": make("c", 0.0)}
    inputs = [(i,) for i in range(4)]
    samples, share = common.time_rotating(fns, inputs, warmup_rounds=1, min_rounds=5, max_rounds=7,
                                          min_seconds=0.0)
    assert {k: len(v) for k, v in samples.items()} == {"a": 5, "b": 5, "c": 5}
    assert min(samples["a"]) >= 0.002 > common.percentile(samples["b"], 50)
    for name in fns:  # each provider walks the input list in order, wrapping around
        assert [i for n, i in calls if n == name] == [0, 1, 2, 3, 0, 1]
    rounds = [tuple(n for n, _ in calls[3 * r:3 * r + 3]) for r in range(6)]
    assert rounds[:3] == [("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b")]  # order rotated every round
    assert all(v is None or v >= 0 for v in share.values())
    # min_seconds keeps going past min_rounds, max_rounds stops it.
    samples, _ = common.time_rotating({"a": make("a", 0.001)}, inputs, warmup_rounds=0, min_rounds=1,
                                      max_rounds=30, min_seconds=0.01)
    assert 5 <= len(samples["a"]) <= 30


def test_last_level_cache_is_read():
    llc = common.last_level_cache_bytes()
    assert isinstance(llc, int) and llc >= 1 << 16


def test_model_totals_weight_shapes_by_occurrences(derived):
    from benchmarks import bench_blocks as bb

    for s in derived:
        for m in s.count:
            bb._SHAPES_PER_MODEL[m] = bb._SHAPES_PER_MODEL.get(m, 0) + 1
    try:
        rows = []
        for s in derived:
            if "resnet18" not in s.count:
                continue
            for prov, ms in (("eager", 2.0), ("torch", 1.0)):
                rows.append({"shape": s.name, "provider": prov, "median_ms": ms,
                             "models": " ".join(f"{m}:{n}" for m, n in s.count.items())})
        totals = bb.model_totals(rows, ["eager", "torch"])
        # resnet34 has exactly resnet18's shapes (more of each): 20 and 36 convs.
        assert totals == {"resnet18": {"eager": 2.0 * 20, "torch": 1.0 * 20},
                          "resnet34": {"eager": 2.0 * 36, "torch": 1.0 * 36}}
        assert bb.model_totals(rows[2:], ["eager", "torch"]) == {}  # a shape missing: no total
    finally:
        bb._SHAPES_PER_MODEL.clear()


def test_end_to_end_tiny_run_writes_csv_markdown_and_plots(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["RESNET_KERNELS_CACHE_DIR"] = str(tmp_path / "cache")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_blocks.py"), "--shapes", "ds 1x1s2 64->128,BasicBlock 512",
           "--batch", "1", "--compile", "none", "--min-rounds", "3", "--min-time", "0", "--retries", "0",
           "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    with open(tmp_path / "bench_blocks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["memory_format"] for r in rows} == {"nchw", "channels_last"}
    blocks = [r for r in rows if r["op"] == "block"]
    assert {r["shape"] for r in blocks} == {"BasicBlock 512->512 @7"}
    for r in blocks:
        if r["provider"] in ("eager", "torch", "auto"):
            assert r["status"] == "ok" and float(r["median_ms"]) > 0 and r["agrees"] in ("1", ""), r
        assert r["provider"] != "torch" or r["agrees"] == "1"
    rows = [r for r in rows if r["op"] == "conv_bn_act"]
    by = {(r["memory_format"], r["provider"]): r for r in rows}
    for fmt in ("nchw", "channels_last"):
        for prov in ("eager", "conv_alone", "torch", "auto"):
            r = by[(fmt, prov)]
            assert r["status"] == "ok" and float(r["median_ms"]) > 0 and int(r["samples"]) >= 3
            assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
            assert float(r["pct_roofline"]) > 0 and r["bound"] in ("compute", "memory")
            assert r["device_name"] and r["torch_version"] == torch.__version__ and r["git_commit"]
        assert by[(fmt, "torch")]["agrees"] == "1" and by[(fmt, "auto")]["backend"] == "torch"
        assert by[(fmt, "compile")]["status"].startswith("skipped")
        assert by[(fmt, "triton")]["status"].startswith("unavailable")  # never the interpreter
        assert float(by[(fmt, "eager")]["speedup_vs_eager"]) == 1.0
    md = (tmp_path / "bench_blocks.md").read_text()
    assert md.count("| ds 1x1s2 64->128 norelu @56 |") == 2 and md.count("| BasicBlock 512->512 @7 |") == 2
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["bench_blocks_roofline_float32.png", "bench_blocks_speedup_float32.png"]
    # plot.py renders from the CSV alone, and still renders bench_models.csv.
    again = plot.plot_blocks_csv(tmp_path / "bench_blocks.csv", tmp_path / "again")
    assert all(p.stat().st_size > 10_000 for p in again)
    models_csv = ROOT / "benchmarks" / "results" / "cpu" / "bench_models.csv"
    if models_csv.exists():
        assert plot.plot_csv(models_csv, tmp_path / "models.png").stat().st_size > 10_000
