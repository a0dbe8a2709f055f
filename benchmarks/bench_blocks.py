"""Per-shape benchmark of the fused ops and blocks: every ResNet-18/34/50/101 shape, every provider.

    python benchmarks/bench_blocks.py --quick                       # 8 shapes + 3 blocks, a few minutes on 2 CPU cores
    python benchmarks/bench_blocks.py                               # all 34 shapes + 15 blocks, batch 1 and 8 (CPU)
    python benchmarks/bench_blocks.py --device cuda --dtype float16,bfloat16 --batch 1,32,256

Rows of two kinds (--ops): `conv_bn_act`, one fused op per shape, and `block`, a whole
torchvision BasicBlock / Bottleneck (eval) against resnet_kernels' FusedBasicBlock / FusedBottleneck
(the 15 distinct blocks of the four models; --quick: 3 of them). For blocks, flop is the sum over its
convs and min_bytes reads x and the weights and writes y once (intermediates not counted: the floor
of a block fused end to end).

Shapes (benchmarks/shapes.py): the 34 distinct conv -> BN (-> + shortcut) (-> ReLU) geometries of
torchvision ResNet-18/34/50/101 at 224x224, derived from the models themselves: the stem, every
block conv (BasicBlock 3x3s, Bottleneck 1x1/3x3/1x1, the last one with the residual), every
downsample; --quick keeps 8 of them (benchmarks/shapes.py QUICK). Each row is one shape x provider
x dtype x batch x memory format (NCHW or channels_last: input, weights and residual in that format).

Providers, side by side in one process on the same tensors:
  eager                 nn.Conv2d -> nn.BatchNorm2d (eval) (-> += residual) -> ReLU_, op by op as
                        torchvision runs a block (cuDNN / oneDNN convolution); the baseline
  conv_alone            F.conv2d only: what the convolution alone costs (not a full op; a floor for
                        any epilogue fusion, shown for reference)
  compile               torch.compile(eager module) (default mode); first call reported as first_call_s
  compile_max_autotune  torch.compile(mode="max-autotune-no-cudagraphs"), GPU only (CUDA graphs off
                        so every provider is timed the same way)
  torch, triton, cuda   resnet_kernels.FusedConvBNAct(conv, bn, relu, backend=...), the module that
                        convert() puts in a model; a backend that cannot serve the call gets a row
                        with status "unavailable: <reason>"
  auto                  the same module with backend="auto" (on GPU: the measured, checked choice of
                        backends.py, cached on disk; the backend it took is in `backend`)
torch.compile costs seconds per shape (tens on this CPU), so by default it is compiled only for
the first 3 shapes of the run (--compile all / none to change that).

Timing. GPU: triton.testing.do_bench (CUDA events; L2 cache flushed before every call), median
and p20/p80. CPU: after warm-up rounds, interleaved rounds (each round calls every provider once,
in an order rotated every round; common.time_rotating), every call on the next of a pool of input
sets (x and residual) that together exceed twice the last-level cache, so no call finds its
inputs in cache from the previous one, as inside a network; the garbage collector is paused;
median and p20/p80 of the per-call times (and the minimum), and `speedup_paired`: the median over rounds of
eager's time / the provider's time in the same round (robust to load that comes and goes on a
shared machine). `cpu_share` = process CPU time / (wall x threads) during a provider's calls
(well below 1: other processes took the cores); a configuration whose median share is below
--quiet-share (0.85) is timed again, up to --retries (2; --quick 1) times, and the least contended attempt
is kept (`attempts`); rows still contended are marked in the summary.

Roofline. flop = 2 x multiply-adds of the convolution + the epilogue (scale, shift, residual,
ReLU per output element); min_bytes = x + weight + y (+ residual) in the dtype + fp32 scale and
shift, each touched once. Ceilings are measured at the start of the run on the same device and
dtype: a large matmul (TFLOP/s) and a large copy (GB/s, read + write); GPU: do_bench medians,
CPU: the best of 20+ runs at the start and at the end of the run (a peak; a median on a shared
CPU would measure this process's share of it), and every row's % is computed against the final
ceilings. floor = max(flop / peak,
bytes / bandwidth); pct_roofline = 100 x floor / median (100% = at the roofline; `bound` says
which roof is the floor). Above 100% means the convolution ran faster than the matmul that
measured the peak (on the 2-core CPU here oneDNN's convolution kernels get closer to the FMA peak
than a 1024^3 sgemm), or needed fewer operations than the direct count (Winograd / FFT algorithms).

Correctness: every provider's first output is compared with eager's (max|y - eager| / max|eager|;
agrees = within 1e-4 fp32 (5e-3 when torch's TF32 flags are on), 5e-3 fp16, 3e-2 bf16); a disagreeing
row is flagged in the summary.

Output: DIR/bench_blocks.csv (long format, one row per shape x provider x dtype x batch x memory
format, with device name, threads, torch / CUDA / cuDNN / triton versions, git commit (or
RK_GIT_COMMIT), timestamp), rewritten after every configuration so a run cut short keeps what it
measured; DIR/bench_blocks.md (the markdown summary also printed at the end); PNG plots via
benchmarks/plot.py (from the CSV alone). DIR defaults to bench_out/<cpu|cuda>/ (git-ignored; pass --out benchmarks/results/<cpu|cuda> to publish).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # `python benchmarks/bench_blocks.py` from anywhere
    sys.path.insert(0, str(_REPO_ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
try:
    from tqdm import tqdm  # noqa: E402
except ImportError:  # a bare GPU machine may lack tqdm: print one line per configuration instead
    class tqdm:  # noqa: N801
        def __init__(self, items, desc="", **_):
            self.items, self.desc, self.post = list(items), desc, ""

        def __iter__(self):
            t0 = time.perf_counter()
            for i, item in enumerate(self.items):
                yield item
                print(f"{self.desc}: {i + 1}/{len(self.items)} [{time.perf_counter() - t0:.0f} s] {self.post}",
                      flush=True)

        def set_postfix_str(self, text):
            self.post = text

        def close(self):
            pass

from benchmarks import common  # noqa: E402
from benchmarks.bench_cuda_quick import EagerConvBN  # noqa: E402  (conv -> bn -> (+res) -> relu_, op by op)
from benchmarks.bench_cuda_quick import bench as gpu_bench  # noqa: E402  (do_bench: median, p20, p80 in ms)
from benchmarks.shapes import QUICK_BLOCKS, quick_shapes, resnet_shapes  # noqa: E402

PROVIDERS = ("eager", "conv_alone", "compile", "compile_max_autotune", "torch", "triton", "cuda", "auto")
BACKENDS = ("torch", "triton", "cuda", "auto")
BASELINE = "eager"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
AGREE_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}

CSV_COLUMNS = (
    "op", "shape", "role", "models", "provider", "backend", "status", "dtype", "batch", "memory_format",
    "N", "C", "H", "W", "K", "R", "S", "P", "Q", "stride", "padding", "relu", "residual",
    "median_ms", "p20_ms", "p80_ms", "min_ms", "samples", "first_call_s", "speedup_vs_eager", "speedup_paired",
    "speedup_paired_p20", "speedup_paired_p80", "cpu_share",
    "gflop", "min_mb", "tflops", "gbs", "pct_roofline", "bound", "ceiling_tflops", "ceiling_gbs",
    "max_rel_diff_vs_eager", "agrees", "timer", "input_sets", "attempts",
    "device", "device_name", "capability", "threads", "tf32", "torch_version", "cuda_version", "cudnn_version",
    "triton_version", "torchvision_version", "resnet_kernels_version", "git_commit", "loadavg_1m", "timestamp",
)


# --------------------------------------------------------------------------------------- arguments
def _csv_list(text, allowed=None, what="value"):
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise SystemExit(f"--{what}: unknown {bad}; choose from {sorted(allowed)}")
    return items


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="8 conv_bn_act shapes + 3 blocks, shorter timing (about 2-3 minutes on 2 idle CPU cores)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: bench_out/<device>, git-ignored; the committed results use --out benchmarks/results/<device>)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None,
                   help="comma-separated dtypes (default: float32 on CPU; float16,bfloat16,float32 on CUDA, "
                        "float16 with --quick)")
    p.add_argument("--batch", default=None,
                   help="comma-separated batch sizes (default CPU: 1,8; CUDA: 1,32,256, --quick 32,256)")
    p.add_argument("--formats", default="nchw,channels_last", help="comma-separated subset of nchw,channels_last")
    p.add_argument("--providers", default=None,
                   help=f"comma-separated subset of {PROVIDERS} (default: all; --quick leaves out "
                        "compile_max_autotune, whose autotuning takes minutes per shape)")
    p.add_argument("--shapes", default="", help="comma-separated substrings of shape (and block) names to keep")
    p.add_argument("--ops", default="conv_bn_act,block",
                   help="conv_bn_act (one fused op per shape), block (whole BasicBlock/Bottleneck), or both")
    p.add_argument("--compile", dest="compile_mode", default="some", choices=("some", "all", "none"),
                   help="torch.compile the first --compile-shapes shapes and the first block (some, default), "
                        "everything, or nothing")
    p.add_argument("--compile-shapes", type=int, default=3,
                   help="how many conv_bn_act shapes 'some' compiles (default 3; 0: no block either)")
    p.add_argument("--min-rounds", type=int, default=None, help="CPU: timed rounds at least (default 30, quick 20)")
    p.add_argument("--min-time", type=float, default=None,
                   help="CPU: seconds of timed calls per configuration at least (default 3.0, quick 1.5)")
    p.add_argument("--retries", type=int, default=None,
                   help="CPU: time a configuration again (up to this many times) while other processes took the "
                        "cores (default 2, --quick 1)")
    p.add_argument("--quiet-share", type=float, default=0.85,
                   help="CPU: the CPU share (process CPU time / (wall x threads)) below which a configuration counts "
                        "as contended and is retried (default 0.85)")
    p.add_argument("--warmup-ms", type=float, default=None, help="GPU do_bench warm-up (default 25, quick 10)")
    p.add_argument("--rep-ms", type=float, default=None, help="GPU do_bench window (default 100, quick 40)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    args.dtypes = _csv_list(args.dtype or ("float16" if gpu and args.quick else
                                           "float16,bfloat16,float32" if gpu else "float32"), DTYPES, "dtype")
    try:
        args.batches = [int(b) for b in _csv_list(args.batch or ("32,256" if gpu and args.quick else "1,32,256"
                                                                  if gpu else "1,8"))]
    except ValueError:
        p.error("--batch: comma-separated positive integers")
    if not args.batches or min(args.batches) < 1:
        p.error("--batch: comma-separated positive integers")
    args.formats = _csv_list(args.formats, FORMATS, "formats")
    args.ops = _csv_list(args.ops, ("conv_bn_act", "block"), "ops")
    args.providers = _csv_list(args.providers or ",".join(p for p in PROVIDERS if not (
        args.quick and p == "compile_max_autotune")), PROVIDERS, "providers")
    if BASELINE not in args.providers:
        args.providers.insert(0, BASELINE)  # every speedup and the correctness check need it
    if not gpu and "compile_max_autotune" in args.providers:
        args.providers.remove("compile_max_autotune")  # GPU only (Inductor's GEMM/conv autotuning)
    args.retries = args.retries if args.retries is not None else (1 if args.quick else 2)
    if args.retries < 0 or not 0 < args.quiet_share <= 1:
        p.error("--retries must be >= 0 and --quiet-share in (0, 1]")
    args.min_rounds = args.min_rounds or (20 if args.quick else 30)
    args.min_time = args.min_time if args.min_time is not None else (1.5 if args.quick else 3.0)
    args.warmup_ms = args.warmup_ms or (10 if args.quick else 25)
    args.rep_ms = args.rep_ms or (40 if args.quick else 100)
    if "float16" in args.dtypes and not gpu:
        warnings.warn("float16 on CPU: many kernels are slow reference paths; bfloat16 is the CPU low-precision "
                      "dtype", stacklevel=1)
    return args


# --------------------------------------------------------------------------------------- environment
def loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def environment(device):
    import resnet_kernels as rk

    gpu = device.type == "cuda"
    return {
        "device": device.type, "device_name": common.device_name(device),
        "capability": "sm_%d%d" % torch.cuda.get_device_capability(device) if gpu else "",
        "threads": torch.get_num_threads(),
        "tf32": int(bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)) if gpu else "",
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda or "",
        "cudnn_version": (torch.backends.cudnn.version() or "") if gpu else "",
        "triton_version": common.package_version("triton"),
        "torchvision_version": common.package_version("torchvision"),
        "resnet_kernels_version": rk.__version__,
        "git_commit": os.environ.get("RK_GIT_COMMIT") or common.git_commit(), "timestamp": common.timestamp(),
    }


# --------------------------------------------------------------------------------------- timing
class Timer:
    """do_bench on CUDA; the rotating interleaved CPU timer elsewhere."""

    def __init__(self, device, args):
        self.device, self.args = device, args
        self.gpu = device.type == "cuda"
        self.name = "do_bench" if self.gpu else "cpu_interleaved_rotating"

    def sync(self):
        if self.gpu:
            torch.cuda.synchronize(self.device)

    def run_quietly(self, fns, inputs):
        """(timer.run's result, attempts). CPU: a configuration whose calls got less than
        --quiet-share of the cores (the median over providers of their CPU share: other processes
        were running) is timed again, up to --retries times, a second apart; the attempt with the
        highest share is kept. Bursts of other jobs on a shared machine then cost time, not data."""
        best, best_share, attempt = None, -1.0, 0
        while True:
            attempt += 1
            res = self.run(fns, inputs)
            shares = [v[5] for v in res.values() if v[5] is not None]
            share = common.percentile(shares, 50) if shares else None
            if share is None:
                return res, attempt
            if share > best_share:
                best, best_share = res, share
            if share >= self.args.quiet_share or attempt > self.args.retries:
                return best, attempt
            time.sleep(1.0)

    def run(self, fns, inputs):
        """{provider: (median s, p20 s, p80 s, min s or None, samples, cpu_share,
        (median, p20, p80) over rounds of eager's time / this provider's time in the same round, or None)}."""
        if self.gpu:
            out = {}
            for name, fn in fns.items():
                args = inputs[0]
                med, p20, p80 = gpu_bench(lambda: fn(*args), self.args.warmup_ms, self.args.rep_ms)
                out[name] = (med * 1e-3, p20 * 1e-3, p80 * 1e-3, None, None, None, None)
            return out
        samples, share = common.time_rotating(fns, inputs, min_rounds=self.args.min_rounds,
                                              min_seconds=self.args.min_time, sync=self.sync)
        out = {}
        base = samples.get(BASELINE)
        for name, ts in samples.items():
            paired = None
            if base and len(base) == len(ts):
                ratios = [b / t for b, t in zip(base, ts)]
                paired = tuple(common.percentile(ratios, q) for q in (50, 20, 80))
            out[name] = (common.percentile(ts, 50), common.percentile(ts, 20), common.percentile(ts, 80), min(ts),
                         len(ts), share[name], paired)
        return out


def measure_ceilings(device, dtype, timer):
    """(TFLOP/s of a large matmul in dtype, GB/s of a large copy), measured now on this device.

    GPU: do_bench medians of an 8192^3 matmul and a 1 GiB copy. CPU: the best of at least 20
    interleaved runs of a 1024^3 matmul and a 64 MiB copy (twice the copy's bytes exceed the
    last-level cache), repeated (up to 2 x --retries more times) while other processes took the
    cores: a peak is a best case, and on a shared machine a long median would measure the share of
    the cores this process got rather than what the cores can do."""
    gpu = device.type == "cuda"
    n = 8192 if gpu else 1024
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    nbytes = (1 << 30) if gpu else max(64 << 20, 2 * common.last_level_cache_bytes())
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).normal_(generator=g)
    dst = torch.empty_like(src)
    if gpu:
        t_mm = gpu_bench(lambda: torch.mm(a, b, out=c), timer.args.warmup_ms, timer.args.rep_ms)[0] * 1e-3
        t_cp = gpu_bench(lambda: dst.copy_(src), timer.args.warmup_ms, timer.args.rep_ms)[0] * 1e-3
    else:
        t_mm = t_cp = float("inf")
        for attempt in range(1 + 2 * timer.args.retries):  # like the configurations: retried while contended
            samples, share = common.time_rotating({"mm": lambda: torch.mm(a, b, out=c),
                                                   "copy": lambda: dst.copy_(src)},
                                                  [()], warmup_rounds=2, min_rounds=20, min_seconds=0.5)
            t_mm, t_cp = min(t_mm, min(samples["mm"])), min(t_cp, min(samples["copy"]))
            if min(share.values()) >= timer.args.quiet_share:
                break
            time.sleep(1.0)
    del a, b, c, src, dst
    if gpu:
        torch.cuda.empty_cache()
    return 2 * n ** 3 / t_mm / 1e12, 2 * nbytes / t_cp / 1e9


# --------------------------------------------------------------------------------------- one configuration
def build(shape, batch, dtype, fmt, device, seed, n_sets):
    """(eager module, [input sets (x, residual)]) for one configuration; BN with realistic statistics."""
    mod = EagerConvBN.realistic(shape, seed).to(device=device, dtype=dtype, memory_format=fmt)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    sets = []
    for _ in range(n_sets):
        x = torch.randn(batch, shape.c, shape.h, shape.h, device=device, generator=g).to(dtype).contiguous(
            memory_format=fmt)
        res = None
        if shape.residual:
            res = torch.randn(batch, shape.k, shape.p, shape.p, device=device, generator=g).to(dtype).contiguous(
                memory_format=fmt)
        sets.append((x, res))
    return mod, sets


def input_sets_needed(shape, batch, esize, device):
    """CPU: enough input sets to be twice the last-level cache together (2..64). GPU: one
    (do_bench flushes L2 before every call)."""
    if device.type == "cuda":
        return 1
    per_set = batch * (shape.c * shape.h * shape.h + (shape.k * shape.p * shape.p if shape.residual else 0)) * esize
    return int(min(64, max(2, math.ceil(2 * common.last_level_cache_bytes() / max(per_set, 1)))))


def provider_fns(mod, shape, providers, compile_this, x):
    """({provider: fn(x, res)}, {provider: why not}) for one configuration (x: a sample input)."""
    import resnet_kernels as rk
    from resnet_kernels import backends

    fns, why = {}, {}
    conv, bn = mod.conv, mod.bn
    stride, padding = conv.stride, conv.padding
    for p in providers:
        if p == "eager":
            fns[p] = mod
        elif p == "conv_alone":
            fns[p] = lambda x, res, w=conv.weight: F.conv2d(x, w, None, stride, padding)
        elif p in ("compile", "compile_max_autotune"):
            if not compile_this:
                why[p] = "skipped: not compiled for this shape (--compile all to include)"
                continue
            mode = "max-autotune-no-cudagraphs" if p == "compile_max_autotune" else None
            fns[p] = torch.compile(mod, mode=mode, dynamic=False)
        else:
            if p != "auto":
                ok, reason = backends.supports(p, x, conv.weight, conv.groups)
                if not ok:
                    why[p] = f"unavailable: {reason}"
                    continue
            fused = rk.FusedConvBNAct.from_modules(conv, bn, nn.ReLU() if shape.relu else None, backend=p).eval()
            fns[p] = fused
    return fns, why


def set_roofline(row, ceiling):
    """Fill pct_roofline, bound and the ceiling columns of a measured row from its gflop, min_mb and
    median: floor = max(flop / peak, bytes / bandwidth); pct_roofline = 100 x floor / median."""
    tflops, gbs = ceiling
    t_compute = row["gflop"] * 1e9 / (tflops * 1e12)
    t_memory = row["min_mb"] * 1e6 / (gbs * 1e9)
    row.update(ceiling_tflops=tflops, ceiling_gbs=gbs, pct_roofline=100.0 * max(t_compute, t_memory) / (
        row["median_ms"] * 1e-3), bound="compute" if t_compute >= t_memory else "memory")


def rel_diff(y, ref):
    y, ref = y.double(), ref.double()
    return ((y - ref).abs().max() / (ref.abs().max() + 1e-6)).item()


def auto_choice(mod, shape, x, res):
    """The backend `auto` serves this call with (after its first call: no new check or timing)."""
    import resnet_kernels as rk
    from resnet_kernels import backends

    scale, shift = rk.fold_bn(mod.bn.weight, mod.bn.bias, mod.bn.running_mean, mod.bn.running_var, mod.bn.eps)
    call = (scale, shift, res, mod.conv.stride, mod.conv.padding, mod.conv.dilation, 1, shape.relu)
    return backends.resolve("auto", x, mod.conv.weight, 1, call=call)


def bench_config(shape, dtype_name, batch, fmt_name, args, device, timer, ceilings, env, compile_this):
    """Rows of one conv_bn_act shape x dtype x batch x memory format, one per provider."""
    dtype, fmt = DTYPES[dtype_name], FORMATS[fmt_name]
    esize = torch.empty((), dtype=dtype).element_size()
    n_sets = input_sets_needed(shape, batch, esize, device)
    mod, sets = build(shape, batch, dtype, fmt, device, args.seed, n_sets)
    fns, why = provider_fns(mod, shape, args.providers, compile_this, sets[0][0])
    flop, nbytes = shape.flops(batch), shape.min_bytes(batch, esize)
    conv_bytes = nbytes - (batch * shape.k * shape.p * shape.p * esize if shape.residual else 0) - 2 * shape.k * 4
    base = {
        "op": "conv_bn_act", "shape": shape.name, "role": shape.role,
        "models": " ".join(f"{m}:{n}" for m, n in shape.count.items()), "dtype": dtype_name, "batch": batch,
        "memory_format": fmt_name, "N": batch, "C": shape.c, "H": shape.h, "W": shape.h, "K": shape.k,
        "R": shape.r, "S": shape.r, "P": shape.p, "Q": shape.p, "stride": shape.stride, "padding": shape.padding,
        "relu": int(shape.relu), "residual": int(shape.residual), "timer": timer.name, "input_sets": n_sets,
        **env,
    }
    rows = measure(base, mod, fns, why, sets, args, timer, ceilings[dtype_name], env, flop,
                   {p: (conv_bytes if p == "conv_alone" else nbytes) for p in fns},
                   auto_backend=lambda: auto_choice(mod, shape, *sets[0]))
    del mod, sets, fns
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def build_block(block, batch, dtype, fmt, device, seed, n_sets):
    """(eval torchvision block with realistic BN statistics, [input sets (x,)])."""
    torch.manual_seed(seed)
    mod = block.build()
    with torch.no_grad():
        for m in mod.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.25, 1.75)
                m.weight.uniform_(0.2, 1.2)
                m.bias.normal_(0.0, 0.3)
    mod = mod.eval().to(device=device, dtype=dtype, memory_format=fmt)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    sets = [(torch.randn(batch, block.inplanes, block.h, block.h, device=device, generator=g).to(dtype).contiguous(
        memory_format=fmt),) for _ in range(n_sets)]
    return mod, sets


def bench_block_config(block, dtype_name, batch, fmt_name, args, device, timer, ceilings, env, compile_this):
    """Rows of one whole residual block (torchvision eval block vs resnet_kernels' fused block)."""
    import resnet_kernels as rk
    from resnet_kernels import backends

    dtype, fmt = DTYPES[dtype_name], FORMATS[fmt_name]
    esize = torch.empty((), dtype=dtype).element_size()
    per_set = batch * block.inplanes * block.h * block.h * esize
    n_sets = 1 if device.type == "cuda" else int(min(64, max(2, math.ceil(
        2 * common.last_level_cache_bytes() / per_set))))
    mod, sets = build_block(block, batch, dtype, fmt, device, args.seed, n_sets)
    fused_cls = rk.FusedBasicBlock if block.kind == "BasicBlock" else rk.FusedBottleneck
    fns, why = {}, {}
    for p in args.providers:
        if p == "eager":
            fns[p] = mod
        elif p == "conv_alone":
            why[p] = "skipped: conv_bn_act rows only"
        elif p in ("compile", "compile_max_autotune"):
            if not compile_this:
                why[p] = "skipped: not compiled for this block (--compile all to include)"
                continue
            fns[p] = torch.compile(mod, mode="max-autotune-no-cudagraphs" if p == "compile_max_autotune" else None,
                                   dynamic=False)
        else:
            if p != "auto":
                ok, reason = backends.supports(p, sets[0][0], mod.conv1.weight, 1)
                if not ok:
                    why[p] = f"unavailable: {reason}"
                    continue
            fns[p] = fused_cls.from_block(mod, backend=p).eval()
    base = {
        "op": "block", "shape": block.name, "role": block.kind,
        "models": " ".join(f"{m}:{n}" for m, n in block.count.items()), "dtype": dtype_name, "batch": batch,
        "memory_format": fmt_name, "N": batch, "C": block.inplanes, "H": block.h, "W": block.h, "K": block.out,
        "P": block.p, "Q": block.p, "stride": block.stride, "relu": 1, "residual": 1, "timer": timer.name,
        "input_sets": n_sets, **env,
    }
    nbytes = block.min_bytes(batch, esize)
    rows = measure(base, mod, fns, why, sets, args, timer, ceilings[dtype_name], env, block.flops(batch),
                   {p: nbytes for p in fns},
                   auto_backend=lambda: "torch" if not backends._candidates(sets[0][0]) else "per conv (see rows)")
    del mod, sets, fns
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure(base, ref_mod, fns, why, sets, args, timer, ceiling, env, flop, nbytes, auto_backend=None):
    """Rows (one per provider in args.providers) of one configuration: the first call of every
    provider (compilation, autotuning, auto's check and timing) and the correctness check against
    the baseline outside the timed region, then the timing, then the derived columns.

    fns: {provider: fn(*input set)}; why: {provider: status of one that is not measured};
    nbytes: {provider: minimum bytes}; auto_backend: () -> what auto took, after its first call."""
    dtype = DTYPES[base["dtype"]]
    tol = AGREE_TOL[dtype] * (50 if dtype == torch.float32 and env.get("tf32") == 1 else 1)  # TF32: ~1e-3
    rows = {}
    for p in args.providers:
        if p not in fns:
            rows[p] = dict(base, provider=p, status=why.get(p, "skipped"))
    live = {}
    with torch.inference_mode():
        ref = ref_mod(*sets[0]).clone()
        for p, fn in fns.items():
            try:
                timer.sync()
                t0 = time.perf_counter()
                y = fn(*sets[0])
                timer.sync()
                first = time.perf_counter() - t0
                diff = rel_diff(y, ref) if p != "conv_alone" else None
                for args_ in sets[1:3]:
                    fn(*args_)  # the rotation's other inputs compile nothing new
                live[p] = fn
                backend = p if p in ("torch", "triton", "cuda") else (
                    auto_backend() if p == "auto" and auto_backend else "")
                rows[p] = dict(base, provider=p, backend=backend, status="ok", first_call_s=first,
                               max_rel_diff_vs_eager=diff, agrees="" if diff is None else int(diff <= tol))
                del y
            except Exception as e:  # noqa: BLE001 - one broken provider must not end the run
                msg = str(e).splitlines()[0][:200] if str(e) else ""
                rows[p] = dict(base, provider=p, status=f"error: {type(e).__name__}: {msg}")
        results, attempts = timer.run_quietly(live, sets) if live else ({}, 0)
    load = loadavg()
    eager = results.get(BASELINE)
    for p, (med, p20, p80, best, n, share, paired) in results.items():
        rows[p].update(median_ms=med * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3,
                       min_ms=None if best is None else best * 1e3, samples=n, cpu_share=share, attempts=attempts,
                       speedup_vs_eager=eager[0] / med if eager else None,
                       speedup_paired=paired[0] if paired else None,
                       speedup_paired_p20=paired[1] if paired else None,
                       speedup_paired_p80=paired[2] if paired else None,
                       gflop=flop / 1e9, min_mb=nbytes[p] / 1e6, tflops=flop / med / 1e12, gbs=nbytes[p] / med / 1e9,
                       loadavg_1m=load)
        set_roofline(rows[p], ceiling)
    for p in rows:
        rows[p].setdefault("loadavg_1m", load)
    return [rows[p] for p in args.providers if p in rows]


# --------------------------------------------------------------------------------------- output
def write_csv(rows, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                        for k in CSV_COLUMNS})
    os.replace(tmp, path)


def _f(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def render_markdown(rows, env, args, ceilings):
    """The summary: per dtype x batch x format, a table of shapes x providers (median ms and speedup
    vs eager), auto's choice, the best provider's % of roofline; and per model an estimate of the
    total conv_bn_act time (shape medians x occurrences) when every shape of that model was run."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("median_ms") is not None]
    provs = [p for p in args.providers if any(r["provider"] == p for r in ok)]
    cap = f", {env['capability']}" if env["capability"] else ""
    timer = "triton.testing.do_bench" if env["device"] == "cuda" else "interleaved rounds, rotated inputs"
    lines = [f"## conv_bn_act per shape: {env['device_name']} ({env['device']}{cap}), {env['threads']} threads", "",
             f"torch {env['torch_version']}, triton {env['triton_version']}, CUDA {env['cuda_version'] or '-'}, "
             f"resnet_kernels {env['resnet_kernels_version']}, commit {env['git_commit']}, {env['timestamp']}. "
             f"Timer: {timer}.",
             "Ceilings measured in this run: " + "; ".join(f"{d}: {t:.2f} TFLOP/s matmul, {g:.1f} GB/s copy"
                                                          for d, (t, g) in ceilings.items()) + ".", ""]
    loads = [float(r["loadavg_1m"]) for r in rows if _f(r.get("loadavg_1m")) is not None]
    shares = [float(r["cpu_share"]) for r in ok if _f(r.get("cpu_share")) is not None]
    if env["device"] == "cpu" and loads and max(loads) > (os.cpu_count() or 1):
        lines += [f"**Shared machine**: 1-minute load average up to {max(loads):.1f} on {os.cpu_count()} CPUs during "
                  f"the run (median CPU share of the timed calls {common.percentile(shares, 50):.2f}): other processes "
                  "took the cores, so single timings are noisy; compare providers within a row (interleaved rounds, "
                  "`speedup_paired` in the CSV), not absolute times.", ""]
    groups = {}
    for r in ok:
        groups.setdefault((r["op"], r["dtype"], r["batch"], r["memory_format"]), []).append(r)
    for (op, dt, b, fm), rs in sorted(groups.items(), key=lambda kv: kv[0][0] != "conv_bn_act"):
        by = {(r["shape"], r["provider"]): r for r in rs}
        shapes = list(dict.fromkeys(r["shape"] for r in rs))
        how = "paired speedup vs eager" if any(_f(r.get("speedup_paired")) for r in rs) else "speedup vs eager"
        what = "conv_bn_act per shape" if op == "conv_bn_act" else "whole blocks (torchvision vs FusedBasicBlock / " \
            "FusedBottleneck)"
        lines += [f"### {what}, {dt}, batch {b}, {fm}: median ms ({how})", ""]
        head = ["shape"] + provs + ["auto took", "best % roofline"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in shapes:
            cells = [s]
            for p in provs:
                r = by.get((s, p))
                if r is None:
                    cells.append("-")
                    continue
                sp = _f(r.get("speedup_paired")) or _f(r.get("speedup_vs_eager"))
                flag = " **!=eager**" if str(r.get("agrees")) == "0" else ""
                show = sp and p not in (BASELINE, "conv_alone")
                share = _f(r.get("cpu_share"))
                busy = "~" if share is not None and share < args.quiet_share else ""
                cells.append(f"{busy}{float(r['median_ms']):.3g}" + (f" ({sp:.2f}x)" if show else "") + flag)
            a = by.get((s, "auto"))
            cells.append(a.get("backend", "") if a else "-")
            full = [by[(s, p)] for p in provs if (s, p) in by and p != "conv_alone"]
            best = min(full, key=lambda r: float(r["median_ms"])) if full else None
            cells.append(f"{float(best['pct_roofline']):.0f}% ({best['provider']})" if best else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        totals = model_totals(rs, provs) if op == "conv_bn_act" else {}
        if totals:
            lines += [f"Estimated conv_bn_act total per model ({dt}, batch {b}, {fm}; sum of shape medians x "
                      "occurrences, every shape of the model measured):", ""]
            head = ["model"] + [p for p in provs if p != "conv_alone"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for model, tot in totals.items():
                e = tot.get(BASELINE)
                lines.append("| " + " | ".join([model] + [
                    (f"{tot[p]:.3g} ms" + (f" ({e / tot[p]:.2f}x)" if e and p != BASELINE else "")) if p in tot else "-"
                    for p in head[1:]]) + " |")
            lines.append("")
    if any(_f(r.get("cpu_share")) is not None and float(r["cpu_share"]) < args.quiet_share for r in ok):
        lines += [f"~ : still contended after {args.retries + 1} attempt(s) (CPU share below {args.quiet_share}): "
                  "other processes took the cores during these calls; read that time as an upper bound.", ""]
    bad = [r for r in ok if str(r.get("agrees")) == "0"]
    if bad:
        lines += ["Rows that DISAGREE with eager: " + ", ".join(
            f"{r['shape']} / {r['provider']} ({r['dtype']}, {r['memory_format']}, diff {r['max_rel_diff_vs_eager']})"
            for r in bad), ""]
    errs = [r for r in rows if str(r.get("status", "")).startswith("error")]
    if errs:
        lines += ["Errors: " + "; ".join(f"{r['shape']} / {r['provider']}: {r['status']}" for r in errs), ""]
    skipped = sorted({f"{r['provider']}: {r['status']}" for r in rows
                      if str(r.get("status", "")).startswith(("unavailable", "skipped"))})
    if skipped:
        lines += ["Not measured: " + "; ".join(skipped), ""]
    return "\n".join(lines)


def model_totals(rows, provs):
    """{model: {provider: ms}} summed over shapes x occurrences, for models whose every shape is in rows."""
    from benchmarks.shapes import MODELS
    shapes = {}
    for r in rows:
        shapes.setdefault(r["shape"], {})[r["provider"]] = float(r["median_ms"])
        shapes[r["shape"]]["_count"] = dict(kv.split(":") for kv in r["models"].split())
    out = {}
    for model in MODELS:
        mine = {s: v for s, v in shapes.items() if model in v["_count"]}
        if not mine or len(mine) < _SHAPES_PER_MODEL.get(model, 1 << 30):
            continue
        tot = {}
        for p in provs:
            if p == "conv_alone" or not all(p in v for v in mine.values()):
                continue
            tot[p] = sum(v[p] * int(v["_count"][model]) for v in mine.values())
        out[model] = tot
    return out


_SHAPES_PER_MODEL = {}  # {model: number of distinct shapes}, filled by main from shapes.resnet_shapes()


# --------------------------------------------------------------------------------------- main
def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    # Never time the Triton interpreter (a correctness tool): it must be off before resnet_kernels
    # is imported (its backend table is read once, at import).
    if "resnet_kernels" in sys.modules and sys.modules["resnet_kernels"].backends._INTERPRET:
        raise SystemExit("bench_blocks: resnet_kernels was imported with TRITON_INTERPRET=1 in this process; "
                         "run the benchmark in a fresh process without it")
    os.environ.pop("TRITON_INTERPRET", None)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # eager gets cuDNN's best algorithm per shape
    import resnet_kernels as rk  # noqa: F401  (after TRITON_INTERPRET is gone: registers the ops)

    shapes = resnet_shapes()
    for s in shapes:
        for m in s.count:
            _SHAPES_PER_MODEL[m] = _SHAPES_PER_MODEL.get(m, 0) + 1
    if args.quick:
        shapes = quick_shapes(shapes)
    blocks = []
    if "block" in args.ops:
        try:
            from benchmarks.shapes import resnet_blocks
            blocks = resnet_blocks()
        except ImportError as e:  # torchvision missing (a bare GPU machine): conv_bn_act rows only
            print(f"no block rows: {e}")
        if args.quick:
            blocks = [b for b in blocks if b.name in QUICK_BLOCKS]
    if "conv_bn_act" not in args.ops:
        shapes = []
    if args.shapes:
        keys = [k.strip() for k in args.shapes.split(",") if k.strip()]
        shapes = [s for s in shapes if any(k in s.name for k in keys)]
        blocks = [b for b in blocks if any(k in b.name for k in keys)]
    if not shapes and not blocks:
        raise SystemExit("--shapes / --ops: nothing to measure")
    compile_names = {s.name for s in (shapes + blocks if args.compile_mode == "all" else
                                      shapes[:args.compile_shapes] + blocks[:min(1, args.compile_shapes)]
                                      if args.compile_mode == "some" else [])}
    out_dir = args.out or (_REPO_ROOT / "bench_out" / device.type)
    csv_path, md_path = out_dir / "bench_blocks.csv", out_dir / "bench_blocks.md"
    env = environment(device)
    timer = Timer(device, args)
    print(f"bench_blocks: {env['device_name']} ({device.type}), {env['threads']} threads, "
          f"torch {env['torch_version']}, triton {env['triton_version']}, commit {env['git_commit']}, "
          f"load average {loadavg()}")
    print(f"{len(shapes)} conv_bn_act shapes + {len(blocks)} blocks x dtypes {args.dtypes} x batches {args.batches} "
          f"x formats {args.formats}; providers "
          f"{args.providers}; torch.compile on {len(compile_names)} shape(s); timer {timer.name}")
    ceilings = {}
    for d in args.dtypes:
        ceilings[d] = measure_ceilings(device, DTYPES[d], timer)
        print(f"ceilings {d}: {ceilings[d][0]:.3f} TFLOP/s (matmul), {ceilings[d][1]:.1f} GB/s (copy)", flush=True)

    configs = [(bench_config, s, d, b, f) for s in shapes for d in args.dtypes for b in args.batches
               for f in args.formats]
    configs += [(bench_block_config, s, d, b, f) for s in blocks for d in args.dtypes for b in args.batches
                for f in args.formats]
    rows = []
    bar = tqdm(configs, desc="bench_blocks", unit="config", dynamic_ncols=True)
    for fn, shape, d, b, f in bar:
        bar.set_postfix_str(f"{shape.name} {d} N={b} {f}")
        rows += fn(shape, d, b, f, args, device, timer, ceilings, env, shape.name in compile_names)
        write_csv(rows, csv_path)  # after every configuration: a run cut short keeps what it measured
    bar.close()
    if device.type == "cpu":
        # The peak is the best seen in the run: measured again at the end (a shared machine may have
        # been busy at the start), and every row's roofline recomputed against the final ceilings.
        for d in args.dtypes:
            again = measure_ceilings(device, DTYPES[d], timer)
            ceilings[d] = (max(ceilings[d][0], again[0]), max(ceilings[d][1], again[1]))
            print(f"ceilings {d} (best of start and end): {ceilings[d][0]:.3f} TFLOP/s, {ceilings[d][1]:.1f} GB/s")
        for r in rows:
            if r.get("median_ms") is not None:
                set_roofline(r, ceilings[r["dtype"]])
        write_csv(rows, csv_path)

    md = render_markdown(rows, env, args, ceilings)
    print("\n" + md)
    md_path.write_text(md + "\n")
    written = [csv_path, md_path]
    if not args.no_plot:
        try:
            from benchmarks import plot
            written += plot.plot_blocks_csv(csv_path, out_dir)
        except ImportError as e:  # matplotlib missing: the CSV is complete, plot it elsewhere
            print(f"no plots ({e}); render them anywhere with: python benchmarks/plot.py {csv_path}")
    print(f"wrote {', '.join(str(p) for p in written)} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
