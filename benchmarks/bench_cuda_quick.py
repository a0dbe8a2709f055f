"""Quick GPU benchmark of one fused conv_bn_act per ResNet-50 layer shape, provider by provider.

    python benchmarks/bench_cuda_quick.py --quick --out bench_out/      # about 1-2 minutes on an H200
    python benchmarks/bench_cuda_quick.py --no-compile                  # every shape, no torch.compile

Shapes: ResNet-50 convolutions at batch 256 (default), fp16, channels_last activations, eval-mode BN
with random statistics: the stem (7x7 s2, C=3), layer1's 1x1 64->64, 3x3 64->64, 1x1 64->256 with
the block's residual, layer2's stride-2 3x3 and its 3x3, layer3 and layer4 3x3 (--quick); the full
set adds layer1's 1x1 256->64, layer2's stride-2 downsample, layer3/4's expanding 1x1 with residual.

Providers, all in one process on the same tensors:
  eager        nn.Conv2d -> nn.BatchNorm2d (eval) (-> += residual) -> ReLU_, as torchvision runs a
               model.half(): cuDNN conv, cuDNN BN inference, two elementwise kernels (the baseline)
  conv_alone   F.conv2d only (cuDNN): what the convolution alone costs, the floor of any epilogue fusion
  compile      torch.compile(eager module), default mode; only the shapes marked below (or --compile all)
               because compilation dominates the run time; its first call is reported as first_call_s
  cuda, triton, torch   resnet_kernels.fused_conv_bn_act(..., backend=...): the hand-written CUDA
               kernels, the Triton kernel (first call autotunes), the ATen composite

Timing: triton.testing.do_bench (CUDA events, L2 flushed between runs), median and p20/p80 in ms,
after a first call that compiles/autotunes and is checked against eager (max|y - eager| / max|eager|).
Derived: speedup = eager / provider, "x conv" = provider / conv_alone, TFLOP/s from
2*N*P*Q*K*R*S*C, GB/s from the op's minimum traffic x + w + y (+ residual) (conv_alone: x + w + y),
both also as a share of ceilings measured in the same run (a large fp16 matmul, a large copy).

Output: markdown tables on stdout and in DIR/bench_cuda_quick.md; DIR/bench_cuda_quick.csv in long
format (one row per shape x provider) with device, capability, torch / triton / CUDA / cuDNN versions,
git commit (or RK_GIT_COMMIT), timestamp and the ceilings. DIR defaults to bench_out/.
Works with torch 2.11 / triton 3.6 and torch 2.14 / triton 3.8; exits cleanly without a GPU.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # `python benchmarks/bench_cuda_quick.py` from anywhere
    sys.path.insert(0, str(_REPO_ROOT))

import torch  # noqa: E402

from benchmarks.common import git_commit, package_version, timestamp  # noqa: E402

PROVIDERS = ("eager", "conv_alone", "compile", "cuda", "triton", "torch")


@dataclass(frozen=True)
class Shape:
    name: str
    c: int
    k: int
    h: int
    r: int
    stride: int = 1
    relu: bool = True
    residual: bool = False
    quick: bool = False
    compile_default: bool = False

    @property
    def padding(self):
        return self.r // 2

    @property
    def p(self):
        return (self.h + 2 * self.padding - self.r) // self.stride + 1


SHAPES = [
    Shape("stem 7x7s2 3->64 @224", 3, 64, 224, 7, 2, quick=True),
    Shape("l1 1x1 64->64 @56", 64, 64, 56, 1, quick=True),
    Shape("l1 3x3 64->64 @56", 64, 64, 56, 3, quick=True, compile_default=True),
    Shape("l1 1x1 64->256 +res @56", 64, 256, 56, 1, residual=True, quick=True, compile_default=True),
    Shape("l1 1x1 256->64 @56", 256, 64, 56, 1),
    Shape("l2 3x3s2 128->128 @56", 128, 128, 56, 3, 2, quick=True),
    Shape("l2 3x3 128->128 @28", 128, 128, 28, 3, quick=True),
    Shape("l2 ds 1x1s2 256->512 @56", 256, 512, 56, 1, 2, relu=False),
    Shape("l3 3x3 256->256 @14", 256, 256, 14, 3, quick=True),
    Shape("l3 1x1 256->1024 +res @14", 256, 1024, 14, 1, residual=True),
    Shape("l4 3x3 512->512 @7", 512, 512, 7, 3, quick=True),
    Shape("l4 1x1 512->2048 +res @7", 512, 2048, 7, 1, residual=True),
]

CSV_COLUMNS = ["timestamp", "device", "capability", "torch", "triton", "cuda", "cudnn", "git_commit", "batch",
               "dtype", "shape", "N", "C", "H", "W", "K", "R", "S", "stride", "padding", "residual", "relu",
               "provider", "status", "ms_median", "ms_p20", "ms_p80", "first_call_s", "gflop", "min_mb",
               "tflops", "gbs", "pct_ceiling_tflops", "pct_ceiling_gbs", "speedup_vs_eager", "ratio_vs_conv_alone",
               "max_rel_diff_vs_eager", "cuda_plan", "ceiling_tflops", "ceiling_gbs"]


# --------------------------------------------------------------------------------------- timing
def bench(fn, warmup_ms, rep_ms):
    """[median, p20, p80] in ms: triton.testing.do_bench when Triton is importable, else CUDA events."""
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001 - no (working) triton: time it ourselves
        do_bench = None
    if do_bench is not None:
        try:
            r = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        except TypeError:  # a do_bench without quantiles
            r = [do_bench(fn, warmup=warmup_ms, rep=rep_ms)] * 3
        r = list(r) if isinstance(r, (list, tuple)) else [r] * 3
        return [float(v) for v in r]
    return _bench_events(fn, warmup_ms, rep_ms)


def _bench_events(fn, warmup_ms, rep_ms):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / est))):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        times.append((s, e))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in times)
    q = lambda f: ms[min(len(ms) - 1, int(round(f * (len(ms) - 1))))]  # noqa: E731
    return [q(0.5), q(0.2), q(0.8)]


def measure_ceilings(warmup_ms, rep_ms):
    """(TFLOP/s of an 8192^3 fp16 matmul, GB/s of a 1 GiB device-to-device copy), same process."""
    dev = "cuda"
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.float16)
    b = torch.randn(n, n, device=dev, dtype=torch.float16)
    c = torch.empty(n, n, device=dev, dtype=torch.float16)
    ms = bench(lambda: torch.mm(a, b, out=c), warmup_ms, rep_ms)[0]
    tflops = 2 * n ** 3 / (ms * 1e-3) / 1e12
    del a, b, c
    nbytes = 1 << 30
    src = torch.empty(nbytes // 2, device=dev, dtype=torch.float16).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), warmup_ms, rep_ms)[0]
    gbs = 2 * nbytes / (ms * 1e-3) / 1e9  # read + write
    del src, dst
    torch.cuda.empty_cache()
    return tflops, gbs


# --------------------------------------------------------------------------------------- providers
class EagerConvBN(torch.nn.Module):
    """conv -> bn (eval) (-> += residual) -> relu_, torchvision's order and in-place habits."""

    def __init__(self, conv, bn, relu):
        super().__init__()
        self.conv, self.bn, self.relu = conv, bn, relu

    def forward(self, x, residual=None):
        y = self.bn(self.conv(x))
        if residual is not None:
            y += residual
        return torch.relu_(y) if self.relu else y

    @classmethod
    def realistic(cls, shape, seed):
        """An eval-mode conv -> BN (-> ReLU) of `shape` (c, k, r, stride, padding, relu) with seeded
        weights and realistic BN statistics, on the CPU in fp32."""
        torch.manual_seed(seed)
        conv = torch.nn.Conv2d(shape.c, shape.k, shape.r, shape.stride, shape.padding, bias=False)
        bn = torch.nn.BatchNorm2d(shape.k)
        with torch.no_grad():
            bn.running_mean.normal_(0.0, 0.5)
            bn.running_var.uniform_(0.25, 1.75)
            bn.weight.uniform_(0.2, 1.2)
            bn.bias.normal_(0.0, 0.3)
        return cls(conv, bn, shape.relu).eval()


def build(shape: Shape, batch, dtype, seed=0):
    import resnet_kernels as rk

    mod = EagerConvBN.realistic(shape, seed).to("cuda", dtype).to(memory_format=torch.channels_last)
    x = torch.randn(batch, shape.c, shape.h, shape.h, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    res = None
    if shape.residual:
        res = torch.randn(batch, shape.k, shape.p, shape.p, device="cuda", dtype=dtype).contiguous(
            memory_format=torch.channels_last)
    scale, shift = rk.fold_bn(mod.bn.weight, mod.bn.bias, mod.bn.running_mean, mod.bn.running_var, mod.bn.eps)
    return mod, x, res, scale, shift


def provider_fns(shape, mod, x, res, scale, shift, compile_this):
    import torch.nn.functional as F

    import resnet_kernels as rk
    from resnet_kernels import backends

    w = mod.conv.weight
    fns, why = {}, {}
    fns["eager"] = lambda: mod(x, res)
    fns["conv_alone"] = lambda: F.conv2d(x, w, None, shape.stride, shape.padding)
    if compile_this:
        cmod = torch.compile(mod, dynamic=False)
        fns["compile"] = lambda: cmod(x, res)
    else:
        why["compile"] = "skipped: not compiled (--compile all to include)"
    status = backends.status()
    for be in ("cuda", "triton", "torch"):
        ok, reason = status[be]
        if not ok:
            why[be] = f"unavailable: {reason}"
            continue
        fns[be] = (lambda be=be: rk.fused_conv_bn_act(x, w, scale, shift, res, stride=shape.stride,
                                                      padding=shape.padding, relu=shape.relu, backend=be))
    return fns, why


def cuda_plan(shape, x, w):
    try:
        p, s = [shape.padding] * 2, [shape.stride] * 2
        return str(torch.ops.resnet_kernels.conv_bn_act_cuda_plan(x, w, s, p, [1, 1]))
    except Exception:  # noqa: BLE001 - the plan op exists only in CUDA builds
        return ""


def rel_diff(y, ref):
    y, ref = y.float(), ref.float()
    return ((y - ref).abs().max() / (ref.abs().max() + 1e-6)).item()


# --------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the 8 --quick shapes, shorter timing windows")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default: bench_out/)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {PROVIDERS}")
    p.add_argument("--compile", dest="compile_mode", default="default", choices=("default", "all", "none"),
                   help="torch.compile the marked shapes (default), every shape, or none")
    p.add_argument("--no-compile", action="store_true", help="same as --compile none")
    p.add_argument("--shapes", default="", help="comma-separated substrings of shape names to keep")
    p.add_argument("--warmup", type=float, default=None, help="do_bench warmup in ms (default 25, --quick 10)")
    p.add_argument("--rep", type=float, default=None, help="do_bench repetition window in ms (default 100, --quick 40)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda_quick: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to measure. "
              "Run it on a machine with an NVIDIA GPU (see scripts/device_check.sh).")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)  # never time the interpreter
    import resnet_kernels as rk  # noqa: F401  (after the CUDA check: registers the ops)

    dtype = getattr(torch, args.dtype)
    providers = [p for p in args.providers.split(",") if p]
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        raise SystemExit(f"--providers: unknown {sorted(unknown)}; choose from {PROVIDERS}")
    if "eager" not in providers:
        providers.insert(0, "eager")  # the baseline of every speedup and the correctness reference
    compile_mode = "none" if args.no_compile else args.compile_mode
    warmup = args.warmup if args.warmup is not None else (10 if args.quick else 25)
    rep = args.rep if args.rep is not None else (40 if args.quick else 100)
    shapes = [s for s in SHAPES if s.quick or not args.quick]
    if args.shapes:
        keys = [k.strip() for k in args.shapes.split(",") if k.strip()]
        shapes = [s for s in shapes if any(k in s.name for k in keys)]
    torch.backends.cudnn.benchmark = True  # eager gets cuDNN's best algorithm per shape

    t_start = time.perf_counter()
    env = {
        "timestamp": timestamp(),
        "device": torch.cuda.get_device_name(),
        "capability": "sm_%d%d" % torch.cuda.get_device_capability(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()),
        "git_commit": os.environ.get("RK_GIT_COMMIT") or git_commit(),
    }
    print(f"# bench_cuda_quick: {env['device']} ({env['capability']}), torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}, cuDNN {env['cudnn']}, commit {env['git_commit']}")
    print(f"batch {args.batch}, {args.dtype}, channels_last; do_bench warmup {warmup} ms, rep {rep} ms; "
          f"compile: {compile_mode}")
    ceil_tflops, ceil_gbs = measure_ceilings(warmup, rep)
    print(f"measured ceilings: {ceil_tflops:.0f} TFLOP/s (fp16 8192^3 matmul), {ceil_gbs:.0f} GB/s (1 GiB copy)\n")
    env.update(ceiling_tflops=f"{ceil_tflops:.1f}", ceiling_gbs=f"{ceil_gbs:.1f}")

    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = args.out / "bench_cuda_quick.csv", args.out / "bench_cuda_quick.md"
    esize = torch.empty((), dtype=dtype).element_size()
    for shape in shapes:
        n, c, h, k, r, p = args.batch, shape.c, shape.h, shape.k, shape.r, shape.p
        flop = 2 * n * p * p * k * r * r * c
        x_b, w_b, y_b = n * c * h * h * esize, k * c * r * r * esize, n * k * p * p * esize
        op_bytes = x_b + w_b + y_b + (y_b if shape.residual else 0)
        compile_this = "compile" in providers and (compile_mode == "all" or
                                                   (compile_mode == "default" and shape.compile_default))
        mod, x, res, scale, shift = build(shape, n, dtype)
        fns, why = provider_fns(shape, mod, x, res, scale, shift, compile_this)
        plan = cuda_plan(shape, x, mod.conv.weight) if "cuda" in fns else ""
        results = {}
        with torch.no_grad():
            ref = mod(x, res).clone()
            for prov in providers:
                base = dict(env, batch=n, dtype=args.dtype, shape=shape.name, N=n, C=c, H=h, W=h, K=k, R=r, S=r,
                            stride=shape.stride, padding=shape.padding, residual=int(shape.residual),
                            relu=int(shape.relu), provider=prov, gflop=f"{flop / 1e9:.2f}",
                            min_mb=f"{op_bytes / 1e6:.1f}", cuda_plan=plan if prov == "cuda" else "")
                if prov not in fns:
                    results[prov] = None
                    rows.append(dict(base, status=why.get(prov, "skipped")))
                    continue
                fn = fns[prov]
                try:
                    t0 = time.perf_counter()
                    y = fn()
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    diff = rel_diff(y, ref) if prov != "conv_alone" else float("nan")
                    del y
                    med, p20, p80 = bench(fn, warmup, rep)
                except Exception as e:  # noqa: BLE001 - one broken provider must not end the run
                    msg = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    print(f"  {shape.name} / {prov}: {msg}", file=sys.stderr)
                    results[prov] = None
                    rows.append(dict(base, status=msg))
                    continue
                nbytes = (x_b + w_b + y_b) if prov == "conv_alone" else op_bytes
                tflops = flop / (med * 1e-3) / 1e12
                gbs = nbytes / (med * 1e-3) / 1e9
                results[prov] = med
                rows.append(dict(base, status="ok", ms_median=f"{med:.4f}", ms_p20=f"{p20:.4f}", ms_p80=f"{p80:.4f}",
                                 first_call_s=f"{first:.2f}", tflops=f"{tflops:.1f}", gbs=f"{gbs:.0f}",
                                 pct_ceiling_tflops=f"{100 * tflops / ceil_tflops:.0f}",
                                 pct_ceiling_gbs=f"{100 * gbs / ceil_gbs:.0f}",
                                 max_rel_diff_vs_eager="" if diff != diff else f"{diff:.2e}"))
        eager_ms, conv_ms = results.get("eager"), results.get("conv_alone")
        for row in rows:
            if row["shape"] == shape.name and row.get("status") == "ok":
                ms = float(row["ms_median"])
                row["speedup_vs_eager"] = f"{eager_ms / ms:.2f}" if eager_ms else ""
                row["ratio_vs_conv_alone"] = f"{ms / conv_ms:.2f}" if conv_ms else ""
        print(f"  {shape.name}: " + ", ".join(f"{pv} {results[pv]:.3f} ms" if results.get(pv) else f"{pv} -"
                                              for pv in providers), flush=True)
        del mod, x, res, scale, shift, fns, ref
        torch.cuda.empty_cache()
        write_csv(rows, csv_path)  # after every shape: a run cut short by a timeout keeps what it measured

    md = render_markdown(rows, providers, shapes, env, args)
    print("\n" + md)
    write_csv(rows, csv_path)
    md_path.write_text(md + "\n")
    print(f"\nwrote {csv_path} and {md_path} ({time.perf_counter() - t_start:.0f} s)")
    return 0


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        wr.writeheader()
        for row in rows:
            wr.writerow({col: row.get(col, "") for col in CSV_COLUMNS})


def render_markdown(rows, providers, shapes, env, args):
    by = {(r["shape"], r["provider"]): r for r in rows}

    def cell_ms(r):
        if r is None or r.get("status") != "ok":
            return "-" if r is None else ("skip" if str(r.get("status", "")).startswith(("skipped", "unavail"))
                                          else "ERR")
        return f"{float(r['ms_median']):.3f} ({float(r['ms_p20']):.3f}-{float(r['ms_p80']):.3f})"

    lines = [f"## conv_bn_act, {env['device']} ({env['capability']}), batch {args.batch}, {args.dtype}, "
             f"channels_last (commit {env['git_commit']})", "",
             f"Ceilings measured in this run: {env['ceiling_tflops']} TFLOP/s (fp16 matmul), "
             f"{env['ceiling_gbs']} GB/s (copy). torch {env['torch']}, triton {env['triton']}, "
             f"CUDA {env['cuda']}, cuDNN {env['cudnn']}.", "",
             "ms per call, median (p20-p80):", ""]
    head = ["shape"] + list(providers) + ["cuda vs eager", "triton vs eager"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for s in shapes:
        cells = [s.name] + [cell_ms(by.get((s.name, p))) for p in providers]
        for p in ("cuda", "triton"):
            r = by.get((s.name, p))
            cells.append(f"{r['speedup_vs_eager']}x" if r and r.get("speedup_vs_eager") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per provider: speedup vs eager, time / conv alone, achieved throughput (% of the ceilings), "
              "max relative difference to eager:", ""]
    head = ["shape", "provider", "ms", "vs eager", "x conv alone", "TFLOP/s", "GB/s", "diff vs eager", "note"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for s in shapes:
        for p in providers:
            r = by.get((s.name, p))
            if r is None:
                continue
            if r.get("status") != "ok":
                lines.append(f"| {s.name} | {p} | - | - | - | - | - | - | {r.get('status', '')} |")
                continue
            d = r.get("max_rel_diff_vs_eager", "")
            note = r.get("cuda_plan", "")
            if d and float(d) > 2e-2:
                note = (note + " DIFFERS FROM EAGER").strip()
            lines.append(f"| {s.name} | {p} | {float(r['ms_median']):.3f} | {r.get('speedup_vs_eager', '')}x | "
                         f"{r.get('ratio_vs_conv_alone', '')} | {r['tflops']} ({r['pct_ceiling_tflops']}%) | "
                         f"{r['gbs']} ({r['pct_ceiling_gbs']}%) | {d or '-'} | {note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
