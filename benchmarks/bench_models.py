"""Whole-model benchmark: torchvision ResNets, eager vs torch.compile vs resnet_kernels.convert.

    python benchmarks/bench_models.py --quick            # resnet18 + resnet50, a few minutes on 2 CPU cores
    python benchmarks/bench_models.py                    # resnet18 + resnet50 + resnet101, 15 rounds
    python benchmarks/bench_models.py --device cuda --dtype float16

Method
------
Models. torchvision resnet18 / resnet50 (--quick) and resnet101 (full run; any torchvision
ResNet-family name works with --models) are built with
seeded random weights; pretrained weights are never downloaded. A random-weight ResNet evaluated
with default BN statistics gives nearly constant logits, which would make top-k agreement
meaningless, so the model is made to behave like a network that has seen images:
  * the last BN gamma of every residual branch (bn2 in BasicBlock, bn3 in Bottleneck) is re-drawn
    from U(0.1, 0.5) (trained ResNets have small final gammas; with gamma=1 the residual stream
    grows block after block and a few channels dominate the pooled features);
  * BN statistics are calibrated on real photos: scikit-image's bundled sample photos (grayscale
    ones stacked to three channels), seeded RandomResizedCrop + horizontal flip to size x size,
    ImageNet mean/std. The model runs a few batches in train mode under no_grad with BN
    momentum=None (cumulative average), then goes to eval();
  * the classifier bias is set to -W @ mean(pooled features over the calibration images), which
    centres the logits so that the image-dependent part decides the top-5 instead of a fixed
    per-class offset.
The script prints the logits' standard deviation across images and the number of distinct top-1
classes, and warns if the logits are (nearly) image-independent.

Accuracy. A fixed batch of --batch photo crops (different seed from calibration; float32 NCHW
contiguous, as a user passes it) runs through every provider. Each output is compared with the
unconverted eager model (same dtype) and with the "oracle", a float64 copy of the unconverted
model: top-1 agreement (fraction of images with the same argmax), top-5 agreement (fraction of
images whose top-5 class *sets* are identical) and max|y - ref| / max|ref| over the logits. The
smallest gap between the 5th and 6th oracle logit is printed too: a near-tie there can flip a
top-5 set under any rounding change, without any kernel being wrong.

Timing. All providers live in ONE process and are timed in interleaved rounds: each round runs
every provider once, in an order rotated from round to round, so slow drifts of the machine
(thermal state, other jobs) hit all providers alike. Providers:
  eager_nchw           the torchvision model, NCHW input (the baseline of every speedup)
  eager_channels_last  the model and the input in channels_last (the input converted beforehand)
  compile              torch.compile(eager model), default mode; its first call (compilation) is
                       timed separately and excluded
  resnet_kernels       resnet_kernels.convert(model), NCHW input (its pre-hook moves the input to
                       channels_last inside the timed call)
Everything runs under torch.inference_mode(), after warm-up rounds, with the garbage collector
paused. One sample = one forward of the whole batch, timed with time.perf_counter (on CUDA with
torch.cuda.synchronize() before and after). The median and the 20th/80th percentiles over the
timed rounds are reported; speedup = median(eager_nchw) / median(provider), and the "paired"
speedup is the median over rounds of eager_nchw's time / the provider's time in the same round
(less sensitive to load that comes and goes between rounds). Contention is made visible rather
than hidden: the "CPU share" of a provider is the process's CPU time during its timed calls /
(wall time x torch threads), near 1 on an idle machine; the 1-minute load average after each
model's timing is recorded too, and a warning printed when other processes competed for the cores.
torch.compile's compile time benefits from Inductor's on-disk cache on repeated runs; --cold-compile
compiles with an empty temporary cache instead.

Output. A table on stdout, DIR/bench_models.csv (long format, one row per model x provider, with
end-to-end images/s, the environment: device, threads, versions, git commit, load average, and the
columns bench_blocks.csv shares: op (model_inference), memory_format (of the input as passed),
capability, CUDA / cuDNN versions) and DIR/bench_models.png,
which benchmarks/plot.py renders from the CSV alone. DIR defaults to bench_out/<device> (git-ignored; pass --out benchmarks/results/<device> to publish).
"""
from __future__ import annotations

import argparse
import atexit
import copy
import csv
import gc
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never depend on pretrained weights

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # `python benchmarks/bench_models.py` from anywhere
    sys.path.insert(0, str(_REPO_ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision  # noqa: E402
from tqdm import tqdm  # noqa: E402

import resnet_kernels as rk  # noqa: E402
from benchmarks import common  # noqa: E402

PROVIDERS = ("eager_nchw", "eager_channels_last", "compile", "resnet_kernels")
BASELINE = "eager_nchw"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

CSV_COLUMNS = (
    "model", "provider", "batch", "size", "dtype", "device", "device_name", "threads",
    "median_ms", "p20_ms", "p80_ms", "images_per_s", "speedup_vs_eager", "speedup_paired", "cpu_share",
    "top1_agree", "top5_agree", "max_rel_err",
    "top1_agree_oracle", "top5_agree_oracle", "max_rel_err_oracle", "oracle_top5_gap_min",
    "compile_s", "compile_cache", "rounds", "warmup_rounds", "backend", "n_fused", "n_skipped",
    "logit_std_across_images", "torch_version", "torchvision_version", "triton_version",
    "resnet_kernels_version", "git_commit", "loadavg_1m", "timestamp",
    # The environment columns bench_blocks.csv carries too (added after the original ones).
    "op", "memory_format", "capability", "cuda_version", "cudnn_version",
)


# ------------------------------------------------------------------------------------ models
def residual_branch_last_bns(model):
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for m in model.modules():
        if isinstance(m, BasicBlock):
            yield m.bn2
        elif isinstance(m, Bottleneck):
            yield m.bn3


@torch.no_grad()
def build_model(name, photos, size, seed, calib_batches, calib_batch):
    """A seeded random-weight torchvision model with BN statistics calibrated on photos (fp32, CPU)."""
    torch.manual_seed(seed)
    try:
        model = getattr(torchvision.models, name)(weights=None)
    except AttributeError:
        raise SystemExit(f"unknown torchvision model {name!r}") from None
    gen = torch.Generator().manual_seed(seed + 1)
    for bn in residual_branch_last_bns(model):
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) * 0.4 + 0.1)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over all calibration batches
    pooled = []
    head = model.fc if isinstance(getattr(model, "fc", None), nn.Linear) else None
    hook = head.register_forward_pre_hook(lambda m, args: pooled.append(args[0].double())) if head else None
    model.train()
    try:
        for i in range(calib_batches):
            model(common.photo_batch(photos, calib_batch, size, seed=seed * 1000 + 100 + i))
    finally:
        if hook is not None:
            hook.remove()
    model.eval()
    if head is not None and head.bias is not None:
        mean_feature = torch.cat(pooled).mean(0)
        head.bias.copy_((-(head.weight.double() @ mean_feature)).float())
    return model


def fusion_counts(model):
    """({fused kind: count}, [(name, reason)] of skipped candidates) from resnet_kernels.summary."""
    kinds, skipped = {}, []
    for name, what in rk.summary(model):
        if what.startswith("skipped"):
            skipped.append((name, what))
        else:
            kind = what.split("(", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds, skipped


# ------------------------------------------------------------------------------------ accuracy
def agreement(y, ref):
    """(top-1 agreement, top-5 set agreement, max|y-ref|/max|ref|) of logits [N, classes]."""
    y, ref = y.double().cpu(), ref.double().cpu()
    top1 = (y.argmax(1) == ref.argmax(1)).double().mean().item()
    k = min(5, y.shape[1])
    same5 = (y.topk(k, 1).indices.sort(1).values == ref.topk(k, 1).indices.sort(1).values).all(1)
    rel = ((y - ref).abs().max() / ref.abs().max()).item()
    return top1, same5.double().mean().item(), rel


def top5_gap(logits):
    """Smallest gap, over the batch, between the 5th and 6th largest logit."""
    v = logits.double().topk(6, 1).values
    return (v[:, 4] - v[:, 5]).min().item()


# ------------------------------------------------------------------------------------ timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(runs, device, rounds, warmup, desc):
    """({provider: [seconds]}, {provider: CPU share}) over `rounds` timed rounds after `warmup` rounds.

    Each round calls every provider once, in an order rotated by one each round. The CPU share is
    this process's CPU time during the provider's timed calls / (wall time x torch threads): near 1
    on an otherwise idle CPU, lower when other processes took the cores (meaningless on CUDA)."""
    names = list(runs)
    samples = {n: [] for n in names}
    cpu = {n: 0.0 for n in names}
    threads = max(torch.get_num_threads(), 1)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        bar = tqdm(range(warmup + rounds), desc=desc, unit="round", leave=True, dynamic_ncols=True)
        for r in bar:
            bar.set_postfix_str("warm-up" if r < warmup else "timed")
            k = r % len(names)
            for name in names[k:] + names[:k]:
                fn, inp = runs[name]
                sync(device)
                c0, t0 = time.process_time(), time.perf_counter()
                fn(inp)
                sync(device)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if r >= warmup:
                    samples[name].append(dt)
                    cpu[name] += dc
        bar.close()
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, {n: cpu[n] / (sum(samples[n]) * threads) for n in names}


# ------------------------------------------------------------------------------------ one model
def bench_model(name, args, photos, device, dtype, env):
    print(f"\n=== {name} ===", flush=True)
    t0 = time.perf_counter()
    model = build_model(name, photos, args.size, args.seed, args.calib_batches, args.calib_batch)
    print(f"built + BN-calibrated on {args.calib_batches}x{args.calib_batch} photo crops "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)

    x32 = common.photo_batch(photos, args.batch, args.size, seed=args.seed * 1000 + 1)  # NCHW fp32 contiguous

    # The oracle: a float64 copy of the unconverted model.
    with torch.inference_mode():
        oracle = copy.deepcopy(model).to(device=device, dtype=torch.float64)
        y_oracle = oracle(x32.to(device=device, dtype=torch.float64)).cpu()
        del oracle
    std_images = y_oracle.std(0).mean().item()
    std_classes = y_oracle.std(1).mean().item()
    distinct = len(set(y_oracle.argmax(1).tolist()))
    print(f"logits (oracle): std across images {std_images:.4f}, std across classes {std_classes:.4f}, "
          f"{distinct} distinct top-1 classes over {args.batch} images", flush=True)
    if std_images < 1e-3 * max(std_classes, 1e-12):
        warnings.warn(f"{name}: logits barely depend on the image (std across images {std_images:.2e}); "
                      "top-k agreement is not meaningful", stacklevel=1)

    model = model.to(device=device, dtype=dtype)
    x = x32.to(device=device, dtype=dtype)  # what a user passes: NCHW contiguous
    x_cl = x.contiguous(memory_format=torch.channels_last)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)

    converted = rk.convert(model, backend=args.backend)
    kinds, skipped = fusion_counts(converted)
    n_fused = sum(kinds.values())
    print(f"resnet_kernels.convert: {n_fused} fused ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}), "
          f"{len(skipped)} skipped", flush=True)
    for sname, reason in skipped:
        print(f"  {sname}: {reason}")

    runs = {"eager_nchw": (model, x), "eager_channels_last": (model_cl, x_cl)}
    compile_s = None
    outputs = {}
    with torch.inference_mode():
        if not args.no_compile:
            compiled = torch.compile(model)
            sync(device)
            t0 = time.perf_counter()
            outputs["compile"] = compiled(x).float().cpu()  # first call: compilation
            sync(device)
            compile_s = time.perf_counter() - t0
            print(f"torch.compile: first call (compilation) {compile_s:.1f} s", flush=True)
            runs["compile"] = (compiled, x)
        runs["resnet_kernels"] = (converted, x)
        runs = {p: runs[p] for p in PROVIDERS if p in runs}
        for p, (fn, inp) in runs.items():
            if p not in outputs:
                outputs[p] = fn(inp).float().cpu()

        acc = {p: agreement(outputs[p], outputs[BASELINE]) + agreement(outputs[p], y_oracle) for p in runs}
        gap = top5_gap(y_oracle)

        samples, cpu_share = time_interleaved(runs, device, args.rounds, args.warmup, desc=f"{name} timing")
    load = loadavg()
    if load is not None and device.type == "cpu" and load > 1.25 * (os.cpu_count() or 1):
        print(f"warning: 1-minute load average {load:.1f} on {os.cpu_count()} CPUs after timing {name}: "
              "other processes competed for the cores, timings are noisy", flush=True)

    base_median = common.percentile(samples[BASELINE], 50)
    rows = []
    for p in runs:
        ts = samples[p]
        med = common.percentile(ts, 50)
        rows.append({
            "model": name, "provider": p, "batch": args.batch, "size": args.size, "dtype": args.dtype,
            "device": device.type, "device_name": env["device_name"], "threads": env["threads"],
            "median_ms": med * 1e3, "p20_ms": common.percentile(ts, 20) * 1e3,
            "p80_ms": common.percentile(ts, 80) * 1e3, "images_per_s": args.batch / med,
            "speedup_vs_eager": base_median / med,
            "speedup_paired": common.percentile([b / t for b, t in zip(samples[BASELINE], ts)], 50),
            "cpu_share": cpu_share[p] if device.type == "cpu" else None,
            "top1_agree": acc[p][0], "top5_agree": acc[p][1], "max_rel_err": acc[p][2],
            "top1_agree_oracle": acc[p][3], "top5_agree_oracle": acc[p][4], "max_rel_err_oracle": acc[p][5],
            "oracle_top5_gap_min": gap,
            "compile_s": compile_s if p == "compile" else None,
            "compile_cache": args.compile_cache if p == "compile" else None,
            "rounds": args.rounds, "warmup_rounds": args.warmup,
            "backend": args.backend if p == "resnet_kernels" else None,
            "n_fused": n_fused if p == "resnet_kernels" else None,
            "n_skipped": len(skipped) if p == "resnet_kernels" else None,
            "logit_std_across_images": std_images,
            "loadavg_1m": load, "op": "model_inference",
            "memory_format": "channels_last" if p == "eager_channels_last" else "nchw",
            **{k: env[k] for k in ("torch_version", "torchvision_version", "triton_version",
                                   "resnet_kernels_version", "git_commit", "timestamp", "capability",
                                   "cuda_version", "cudnn_version")},
        })
    return rows


# ------------------------------------------------------------------------------------ output
def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows):
    headers = ("model", "provider", "median ms", "p20 ms", "p80 ms", "img/s", "speedup", "paired", "cpu share",
               "top1", "top5", "max rel err", "top1 (oracle)", "top5 (oracle)", "max rel err (oracle)")
    body = [(r["model"], r["provider"], fmt(r["median_ms"], ".1f"), fmt(r["p20_ms"], ".1f"),
             fmt(r["p80_ms"], ".1f"), fmt(r["images_per_s"], ".2f"), fmt(r["speedup_vs_eager"], ".2f") + "x",
             fmt(r["speedup_paired"], ".2f") + "x", fmt(r["cpu_share"], ".2f"),
             fmt(r["top1_agree"], ".3f"), fmt(r["top5_agree"], ".3f"), fmt(r["max_rel_err"], ".2e"),
             fmt(r["top1_agree_oracle"], ".3f"), fmt(r["top5_agree_oracle"], ".3f"),
             fmt(r["max_rel_err_oracle"], ".2e")) for r in rows]
    print(common.format_table(body, headers, aligns=["<", "<"] + [">"] * (len(headers) - 2)))
    print("top1/top5/max rel err: vs the eager model (same dtype); (oracle): vs its float64 copy. "
          "speedup = median(eager_nchw) / median; paired = median over rounds of eager_nchw / provider in the "
          "same round;\ncpu share = process CPU time / (wall x threads) during the timed calls (well below 1: other "
          "processes took the cores).")
    for model in dict.fromkeys(r["model"] for r in rows):
        r = next(r for r in rows if r["model"] == model)
        extra = [f"smallest 5th-6th oracle logit gap {r['oracle_top5_gap_min']:.2e}"]
        c = next((r for r in rows if r["model"] == model and r["compile_s"] is not None), None)
        if c is not None:
            how = "cold cache" if c["compile_cache"] == "cold" else "Inductor's on-disk cache may have been warm"
            extra.append(f"torch.compile compilation {c['compile_s']:.1f} s (excluded; {how})")
        print(f"{model}: " + "; ".join(extra))


def write_csv(rows, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                        for k in CSV_COLUMNS})


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="few rounds and a small calibration set (a few minutes on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: bench_out/<device>, git-ignored; the committed results use --out benchmarks/results/<device>)")
    p.add_argument("--models", default=None,
                   help="comma-separated torchvision model names (default: resnet18,resnet50 with --quick, "
                        "else resnet18,resnet50,resnet101)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"),
                   help="resnet_kernels backend passed to convert()")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--cold-compile", action="store_true",
                   help="compile with an empty, temporary Inductor/Triton cache, so compile_s is a cold compile")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 5 with --quick, else 15)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: 1 with --quick, else 3)")
    p.add_argument("--calib-batches", type=int, default=None,
                   help="BN calibration batches (default: 2 with --quick, else 4)")
    p.add_argument("--calib-batch", type=int, default=None,
                   help="images per calibration batch (default: 8 with --quick, else 16)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.rounds = args.rounds or (5 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.calib_batches = args.calib_batches or (2 if args.quick else 4)
    args.calib_batch = args.calib_batch or (8 if args.quick else 16)
    if min(args.batch, args.size, args.rounds, args.calib_batches, args.calib_batch) < 1 or args.warmup < 0:
        p.error("batch, size, rounds and calibration sizes must be positive, warmup non-negative")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.device == "cpu" and args.dtype == "float16":
        warnings.warn("float16 on CPU: many kernels are slow reference paths; bfloat16 is the CPU low-precision "
                      "dtype", stacklevel=1)
    args.models = args.models or ("resnet18,resnet50" if args.quick else "resnet18,resnet50,resnet101")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    return args


def loadavg():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def environment(device):
    return {
        "device_name": common.device_name(device), "threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "torchvision_version": torchvision.__version__,
        "triton_version": common.package_version("triton"), "resnet_kernels_version": rk.__version__,
        "git_commit": common.git_commit(), "timestamp": common.timestamp(),
        "capability": "sm_%d%d" % torch.cuda.get_device_capability(device) if device.type == "cuda" else "",
        "cuda_version": torch.version.cuda or "",
        "cudnn_version": (torch.backends.cudnn.version() or "") if device.type == "cuda" else "",
    }


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    out_dir = args.out or (_REPO_ROOT / "bench_out" / device.type)
    if args.cold_compile and not args.no_compile:
        tmp = tempfile.TemporaryDirectory(prefix="bench_models_inductor_")
        atexit.register(tmp.cleanup)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp.name, "inductor")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp.name, "triton")
    args.compile_cache = "cold" if args.cold_compile else "default"
    env = environment(device)
    print(f"device: {env['device_name']} ({device.type}), threads {env['threads']}, dtype {args.dtype}, "
          f"batch {args.batch}, size {args.size}, {args.rounds} timed rounds after {args.warmup} warm-up")
    print(f"torch {env['torch_version']}, torchvision {env['torchvision_version']}, triton {env['triton_version']}, "
          f"resnet_kernels {env['resnet_kernels_version']} (backends available: {rk.available_backends()}, "
          f"requested {args.backend!r}), commit {env['git_commit']}, load average {loadavg()}")

    photos = common.load_photos()
    print(f"{len(photos)} sample photos: {', '.join(n for n, _ in photos)}")

    rows = []
    for name in args.models:
        rows += bench_model(name, args, photos, device, dtype, env)

    print()
    print_table(rows)
    csv_path = out_dir / "bench_models.csv"
    write_csv(rows, csv_path)
    from benchmarks import plot
    png_path = plot.plot_csv(csv_path, out_dir / "bench_models.png")
    print(f"\nwrote {csv_path} and {png_path}")
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
