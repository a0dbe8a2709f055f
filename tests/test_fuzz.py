"""Differential fuzzing: random fused conv+BN(+residual)(+ReLU) calls on every backend vs float64.

Each seed draws one configuration: batch (1..16), channels (incl. 1, 3, 5, 13, 20, 67: not
multiples of 8), spatial size (incl. 1x1 and odd), filter 1/3/5/7 (sometimes rectangular), stride,
padding (up to one pixel beyond the filter's reach), dilation, groups (incl. depthwise), residual or
not and its layout (NCHW, channels_last, transposed view, channel slice, an expand()ed tensor with
stride 0, x itself, fp32 with fp16/bf16 x), ReLU or not, dtype (fp32, fp16, bf16, fp64), x and
weight memory format (NCHW, channels_last, strided and permuted views), BN statistics from tiny
(1e-10) to huge (1e10) variance with exact zeros, eps from 0 to 0.1, zero and negative gamma, BN
buffers in fp32 or in x's dtype, the functional or the module entry point (with a conv bias), and
rarely NaN/Inf in x. Every backend available here (plus `auto`) is run on it and compared with
the float64 oracle (conv2d -> F.batch_norm in eval mode -> + residual -> ReLU, i.e. the unfused
module run in float64) by the rule of shared/cases/FIELD_CASES.md:

    ERR(fused) <= max(2 x ERR(the unfused eager ops in the same dtype/device), floor)
    floor: 1e-5 fp32, 5e-3 fp16, 3e-2 bf16 (1e-12 fp64)

Non-finite values must sit exactly where the oracle has them (NaN where NaN, +inf/-inf where +-inf;
eps=0 with var=0 gives inf/NaN channels, and that is what the fused op must give too); the output
has x's dtype and follows x's memory format. A backend that cannot serve a configuration (e.g.
`triton` and groups > 1 or fp64) must refuse a call naming it with BackendUnavailable. fp16 cannot
represent outputs beyond 65504: for fp16 draws |gamma| is capped so the true output stays below
1e4 (huge scales still occur: tiny variance with a small gamma).

Training mode (test_fuzz_train) reuses the draws: fused_conv_bn_train's output, running statistics
(momentum incl. None), num_batches_tracked and the gradients of x, weight, gamma, beta, residual
vs float64 autograd through conv2d -> F.batch_norm(training=True); nn.BatchNorm2d's refusals (one
value per channel, eps <= 0 in training) must come with its message.

Tiers
- fast (default; CI): FAST_SEEDS (+ FAST_TRAIN_SEEDS training) seeds on CPU; torch and auto on
  every seed, the Triton interpreter on the seeds small enough for it (TRITON_INTERP_MACS).
- long: ``RESNET_KERNELS_FUZZ=long`` (``RESNET_KERNELS_FUZZ_SEEDS``, default 3000;
  ``RESNET_KERNELS_FUZZ_SECONDS``: seeds after that much time are skipped with that reason):
  larger shapes (batch 16, 256 channels, 225x225); on a CUDA machine the tensors live on the GPU and
  cuda, triton (a tile config drawn per seed from CONFIGS), torch (cuDNN) and auto are compared.
  Long-tier seeds are numbered from 1_000_000 (the seed decides the draw, tier included).

Reproduce a failure (the seed is in the test id and in the message):
    python tests/test_fuzz.py --seed N [--device cuda]     # run it, print each backend's ERR
    python tests/test_fuzz.py --repro N > repro.py          # a standalone script (torch + resnet_kernels)
    python tests/test_fuzz.py --train --seed N              # a training-mode seed
"""
from __future__ import annotations

import math
import os
import random
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as the test suite does (tests/conftest.py)

import resnet_kernels as rk  # noqa: E402
from resnet_kernels import backends  # noqa: E402

LONG_BASE = 1_000_000
FAST_SEEDS = 400
FAST_TRAIN_SEEDS = 150
TRITON_INTERP_MACS = 1.5e6  # the interpreter's budget per call (about 0.2 s)

# ==================================================================================================
# The standalone part: `--repro N` prints these functions' source (they use only torch, math,
# random and resnet_kernels).
# ==================================================================================================
FLOOR = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def draw(seed):
    """The configuration of one seed, as plain Python values (seeds >= 1_000_000: the long tier)."""
    rnd = random.Random(seed)
    big = seed >= 1_000_000
    cfg = {"seed": seed}
    dtype = rnd.choices(["float32", "float16", "bfloat16", "float64"], [4, 2, 2, 1])[0]
    ch = [1, 2, 3, 4, 5, 8, 13, 16, 20, 32] + ([48, 64, 67, 128, 256] if big else [])
    kind = rnd.choices(["one", "grouped", "depthwise"], [7, 2, 1])[0]
    if kind == "one":
        g, c, k = 1, rnd.choice(ch), rnd.choice(ch)
    elif kind == "grouped":
        g = rnd.choice([2, 3, 4, 8] + ([32] if big else []))
        c, k = g * rnd.choice([1, 2, 3, 4, 8]), g * rnd.choice([1, 2, 3, 5, 8])
    else:
        c = rnd.choice([3, 8, 16, 20, 32] + ([64, 128] if big else []))
        g, k = c, c * rnd.choice([1, 1, 2])
    r = rnd.choice([1, 3, 3, 5, 7])
    s = r if rnd.random() < 0.8 else rnd.choice([1, 3, 5, 7])
    dil = (1, 1) if rnd.random() < 0.75 else (rnd.choice([1, 2, 3]), rnd.choice([1, 2, 3]))
    st = rnd.choice([1, 1, 2, 3])
    stride = (st, st) if rnd.random() < 0.7 else (rnd.choice([1, 2, 3]), rnd.choice([1, 2, 3]))
    pad = (rnd.randint(0, (r - 1) // 2 * dil[0] + 1), rnd.randint(0, (s - 1) // 2 * dil[1] + 1))
    res = rnd.choices(["none", "nchw", "channels_last", "transposed", "channel_slice", "expanded", "alias_x"],
                      [4, 2, 2, 1, 1, 1, 1])[0]
    if res == "alias_x":  # the residual is x itself (a BasicBlock's identity): same shape in and out
        k, stride = c, (1, 1)
        pad = ((r - 1) // 2 * dil[0], (s - 1) // 2 * dil[1])
    sizes = [1, 2, 3, 5, 7, 8, 9, 14, 15, 16, 17, 28, 33] + ([56, 57, 64, 100, 225] if big else [])
    budget = 3e8 if big else 2e6  # multiply-adds
    n = rnd.choice([1, 1, 2, 2, 3, 4] + ([8, 16] if big else []))
    for attempt in range(200):
        h = rnd.choice(sizes)
        w = h if rnd.random() < 0.5 else rnd.choice(sizes)
        h = max(h, dil[0] * (r - 1) + 1 - 2 * pad[0])  # at least a 1x1 output
        w = max(w, dil[1] * (s - 1) + 1 - 2 * pad[1])
        p = (h + 2 * pad[0] - dil[0] * (r - 1) - 1) // stride[0] + 1
        q = (w + 2 * pad[1] - dil[1] * (s - 1) - 1) // stride[1] + 1
        if n * k * p * q * (c // g) * r * s <= budget:
            break
        if attempt % 20 == 19:
            n = max(1, n // 2)
    cfg.update(dtype=dtype, n=n, c=c, k=k, h=h, w=w, r=r, s=s, groups=g, stride=stride, padding=pad,
               dilation=dil, p=p, q=q, relu=rnd.random() < 0.6)
    cfg["x_layout"] = rnd.choices(["nchw", "channels_last", "strided", "permuted"], [4, 4, 1, 1])[0]
    cfg["w_layout"] = rnd.choices(["contiguous", "channels_last", "transposed"], [6, 2, 1])[0]
    if res == "alias_x" and (c, h, w) != (k, p, q):
        res = "nchw"
    cfg["residual"] = res
    cfg["residual_fp32"] = dtype in ("float16", "bfloat16") and res not in ("none", "alias_x") and rnd.random() < 0.3
    cfg["bn_dtype"] = ("float64" if dtype == "float64" else
                       dtype if dtype in ("float16", "bfloat16") and rnd.random() < 0.3 else "float32")
    cfg["var_log10"] = rnd.choice([(-1.0, 1.0), (-10.0, -4.0), (4.0, 10.0), (-10.0, 10.0)])
    cfg["zero_var"] = rnd.random() < 0.2
    cfg["eps"] = rnd.choice([0.0, 0.0, 1e-5, 1e-3, 0.1, round(rnd.uniform(0.0, 0.1), 6)])
    cfg["mean_scale"] = round(10 ** rnd.uniform(-2, 2), 4)
    cfg["gamma_scale"] = round(10 ** rnd.uniform(-1, 1), 4)
    cfg["zero_gamma"] = rnd.random() < 0.3
    cfg["beta_scale"] = round(10 ** rnd.uniform(-2, 1), 4)
    cfg["x_scale"] = round(10 ** rnd.uniform(-1, 1), 4)
    cfg["nonfinite_x"] = rnd.random() < 0.06
    cfg["entry"] = "module" if rnd.random() < 0.3 else "functional"
    cfg["conv_bias"] = cfg["entry"] == "module" and rnd.random() < 0.3
    cfg["triton_config"] = rnd.randrange(64)  # index into CONFIGS (mod len) for the GPU tier
    return cfg


def _layout(t, kind):
    """t (a dense NCHW tensor) re-laid out as `kind`; the values stay the same."""
    if kind in ("nchw", "contiguous"):
        return t.contiguous()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind in ("transposed", "permuted"):  # stored N, C, W, H
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if kind == "strided":  # every other column of a wider buffer (not dense in any format)
        buf = torch.full(t.shape[:3] + (2 * t.shape[3] + 1,), float("nan"), dtype=t.dtype, device=t.device)
        buf[..., 1::2] = t
        return buf[..., 1::2]
    if kind == "channel_slice":  # channels 1..K of a wider channels_last buffer
        n, c, h, w = t.shape
        buf = torch.full((n, c + 3, h, w), float("nan"), dtype=t.dtype, device=t.device)
        buf = buf.contiguous(memory_format=torch.channels_last)
        buf[:, 1:c + 1] = t
        return buf[:, 1:c + 1]
    raise ValueError(kind)


def build(cfg, device="cpu"):
    """(inputs on `device` in the drawn dtypes and layouts, the same values in float64 on CPU)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    f64 = torch.float64
    dt, bdt = DTYPES[cfg["dtype"]], DTYPES[cfg["bn_dtype"]]
    n, c, k, h, w, r, s, groups = (cfg[a] for a in ("n", "c", "k", "h", "w", "r", "s", "groups"))
    p, q = cfg["p"], cfg["q"]

    def rounded(t, dtype):  # the values as the dtype holds them
        return t.to(dtype).to(f64)

    x64 = rounded(torch.randn(n, c, h, w, generator=g, dtype=f64) * cfg["x_scale"], dt)
    if cfg["nonfinite_x"]:
        flat = x64.view(-1)
        for val in (float("nan"), float("inf"), float("-inf")):
            flat[torch.randint(0, flat.numel(), (1,), generator=g)] = val
    w64 = rounded(torch.randn(k, c // groups, r, s, generator=g, dtype=f64) / math.sqrt(c // groups * r * s), dt)
    cb64 = rounded(torch.randn(k, generator=g, dtype=f64) * 0.5, dt) if cfg["conv_bias"] else None
    lo, hi = cfg["var_log10"]
    var = 10 ** (torch.rand(k, generator=g, dtype=f64) * (hi - lo) + lo)
    if cfg["zero_var"]:
        var[torch.rand(k, generator=g, dtype=f64) < 0.3] = 0.0
    mean = torch.randn(k, generator=g, dtype=f64) * cfg["mean_scale"]
    gamma = torch.randn(k, generator=g, dtype=f64) * cfg["gamma_scale"]
    if cfg["zero_gamma"]:
        gamma[torch.rand(k, generator=g, dtype=f64) < 0.3] = 0.0
    beta = torch.randn(k, generator=g, dtype=f64) * cfg["beta_scale"]
    var, mean, gamma, beta = (rounded(t, bdt) for t in (var, mean, gamma, beta))
    res_kind = cfg["residual"]
    rdt = torch.float32 if cfg["residual_fp32"] else dt
    if res_kind == "expanded":  # one row per image and channel, broadcast over P: stride 0
        res64 = rounded(torch.randn(n, k, 1, q, generator=g, dtype=f64), rdt).expand(n, k, p, q)
    elif res_kind == "alias_x":
        res64 = x64
    elif res_kind != "none":
        res64 = rounded(torch.randn(n, k, p, q, generator=g, dtype=f64), rdt)
    else:
        res64 = None
    if dt == torch.float16:
        # keep the true output inside fp16's range (|y| < 1e4): cap |gamma| per channel
        conv = F.conv2d(x64.nan_to_num(0.0, 0.0, 0.0), w64, cb64, cfg["stride"], cfg["padding"], cfg["dilation"],
                        groups)
        inv = 1.0 / torch.sqrt(var + cfg["eps"])
        spread = (conv - mean.view(1, -1, 1, 1)).abs().amax((0, 2, 3)) * inv
        room = 1e4 - beta.abs() - (0.0 if res64 is None else res64.abs().max().item())
        cap = torch.where(torch.isfinite(spread) & (spread > 0), room / spread * 0.5, torch.full_like(spread, 1e30))
        gamma = rounded(gamma.sign() * torch.minimum(gamma.abs(), cap), bdt)
    # onto the device, then into the drawn layouts
    x = _layout(x64.to(device, dt), cfg["x_layout"])
    wt = _layout(w64.to(device, dt), cfg["w_layout"])
    if res_kind == "expanded":
        res = res64[:, :, :1].to(device, rdt).expand(n, k, p, q)
    elif res_kind == "alias_x":
        res = x
    elif res_kind != "none":
        res = _layout(res64.to(device, rdt), res_kind)
    else:
        res = None
    bn = {name: t.to(device, bdt) for name, t in (("running_var", var), ("running_mean", mean), ("weight", gamma),
                                                  ("bias", beta))}
    inputs = dict(x=x, weight=wt, conv_bias=None if cb64 is None else cb64.to(device, dt), residual=res, bn=bn)
    exact = dict(x=x64, weight=w64, conv_bias=cb64, residual=res64, var=var, mean=mean, gamma=gamma, beta=beta)
    return inputs, exact


def oracle(cfg, e):
    """The unfused modules in float64 on CPU: conv2d -> BatchNorm2d (eval) -> + residual -> ReLU."""
    y = F.conv2d(e["x"], e["weight"], e["conv_bias"], cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"])
    y = F.batch_norm(y, e["mean"], e["var"], e["gamma"], e["beta"], False, 0.0, cfg["eps"])
    if e["residual"] is not None:
        y = y + e["residual"]
    return y.relu() if cfg["relu"] else y


def unfused(cfg, t):
    """The same unfused ops in the inputs' own dtype and device (PyTorch's own error, for the rule)."""
    bn = t["bn"]
    y = F.conv2d(t["x"], t["weight"], t["conv_bias"], cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"])
    y = F.batch_norm(y, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False, 0.0, cfg["eps"])
    if t["residual"] is not None:
        y = y + t["residual"]
    return y.relu() if cfg["relu"] else y


def call(cfg, t, backend):
    """The fused op through the drawn entry point: rk.fused_conv_bn_act, or rk.FusedConvBNAct."""
    bn = t["bn"]
    with torch.no_grad():
        if cfg["entry"] == "functional":
            scale, shift = rk.fold_bn(bn["weight"], bn["bias"], bn["running_mean"], bn["running_var"], cfg["eps"],
                                      conv_bias=t["conv_bias"])
            if t["x"].dtype == torch.float64:
                scale, shift = scale.double(), shift.double()
            return rk.fused_conv_bn_act(t["x"], t["weight"], scale, shift, t["residual"], stride=cfg["stride"],
                                        padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"],
                                        relu=cfg["relu"], backend=backend)
        conv = nn.Conv2d(cfg["c"], cfg["k"], (cfg["r"], cfg["s"]), cfg["stride"], cfg["padding"], cfg["dilation"],
                         cfg["groups"], bias=t["conv_bias"] is not None, device="meta")
        conv.weight = nn.Parameter(t["weight"], requires_grad=False)
        if t["conv_bias"] is not None:
            conv.bias = nn.Parameter(t["conv_bias"], requires_grad=False)
        norm = nn.BatchNorm2d(cfg["k"], eps=cfg["eps"], device="meta")
        norm.weight = nn.Parameter(bn["weight"], requires_grad=False)
        norm.bias = nn.Parameter(bn["bias"], requires_grad=False)
        norm.running_mean, norm.running_var = bn["running_mean"], bn["running_var"]
        norm.num_batches_tracked = torch.tensor(0, device=t["x"].device)
        fused = rk.FusedConvBNAct.from_modules(conv, norm.eval(), nn.ReLU() if cfg["relu"] else None,
                                               backend=backend).eval()
        return fused(t["x"], t["residual"])


def err_finite(y, ref, fin=None):
    """ERR = max|y - ref| / (max|ref| + 1e-6) over the positions `fin` (default: ref finite), float64."""
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    fin = torch.isfinite(ref) if fin is None else fin
    if not fin.any():
        return 0.0
    d = (y - ref)[fin].abs().max()
    return (d / (ref[fin].abs().max() + 1e-6)).item()


def compare(y, ref64, eager, x, dtype, check_layout=True, floor=None):
    """[] when y is right: dtype, shape, memory format, non-finite positions, the tolerance rule
    (floor: FLOOR[dtype] unless given)."""
    problems = []
    if y.dtype != dtype or tuple(y.shape) != tuple(ref64.shape):
        return [f"got {y.dtype} {tuple(y.shape)}, want {dtype} {tuple(ref64.shape)}"]
    fmt = torch.channels_last if backends.is_channels_last(x) else torch.contiguous_format
    if check_layout and not y.is_contiguous(memory_format=fmt):
        problems.append(f"output strides {y.stride()} do not follow x's memory format {fmt}")
    yc = y.detach().double().cpu()
    ec = eager.detach().double().cpu()
    masks = (("NaN", torch.isnan), ("+inf", lambda t: t == math.inf), ("-inf", lambda t: t == -math.inf))
    # Non-finite values sit where the float64 oracle has them, or exactly where PyTorch's own unfused
    # ops in this dtype put them (oneDNN's bf16 CPU convolution turns an inf input into NaN and
    # spreads it to neighbouring outputs; a backend built on that convolution inherits it).
    if not all(torch.equal(f(yc), f(ec)) for _, f in masks):
        for what, f in masks:
            got, want = f(yc), f(ref64)
            if not torch.equal(got, want):
                where = (got != want).nonzero()[:3].tolist()
                problems.append(f"{what} positions differ from the float64 oracle: {int(got.sum())} vs "
                                f"{int(want.sum())}, e.g. at {where}")
    # The rule over the positions where the oracle, the fused op and PyTorch's own ops are all finite.
    both = torch.isfinite(ref64) & torch.isfinite(yc) & torch.isfinite(ec)
    e, e_eager = err_finite(yc, ref64, both), err_finite(ec, ref64, both)
    bound = max(FLOOR[dtype] if floor is None else floor, 2.0 * e_eager)
    if not e <= bound:
        problems.append(f"ERR={e:.3g} > bound {bound:.3g} (eager ERR {e_eager:.3g})")
    return problems


def run_seed(seed, device="cpu", backends_to_run=None, triton_macs=None, triton_config=None, verbose=False):
    """Check every backend on one seed; returns {backend: list of problems} ('skipped: ...' rows too)."""
    cfg = draw(seed)
    t, e = build(cfg, device)
    if device == "cpu" or cfg["nonfinite_x"]:
        ref64 = oracle(cfg, e)
    else:  # float64 on the GPU (fast for the long tier's shapes); non-finite inputs stay on the CPU's direct conv
        ref64 = oracle(cfg, {k: None if v is None else v.to(device) for k, v in e.items()}).cpu()
    dtype = DTYPES[cfg["dtype"]]
    with torch.no_grad():
        eager = unfused(cfg, t)
    names = backends_to_run or (backends.available_backends() + ["auto"])
    macs = cfg["n"] * cfg["k"] * cfg["p"] * cfg["q"] * (cfg["c"] // cfg["groups"]) * cfg["r"] * cfg["s"]
    out = {}
    for name in names:
        if name != "auto":
            ok, why = backends.supports(name, t["x"], t["weight"], cfg["groups"])
            if not ok:  # asked for by name, it must refuse with the rule
                try:
                    call(cfg, t, name)
                    out[name] = [f"backend {name!r} cannot serve this call ({why}) but did not raise"]
                except backends.BackendUnavailable as ex:
                    out[name] = [] if str(ex) else [f"BackendUnavailable without a message for {name!r}"]
                    if verbose:
                        print(f"  {name:7s} refuses as it should: {ex}")
                continue
            if name == "triton" and t["x"].device.type == "cpu" and triton_macs is not None and macs > triton_macs:
                out[name] = [f"skipped: {macs:.3g} multiply-adds is too many for the Triton interpreter"]
                continue
        if name == "triton" and triton_config is not None:
            with triton_config(cfg):
                y = call(cfg, t, name)
        else:
            y = call(cfg, t, name)
        out[name] = compare(y, ref64, eager, t["x"], dtype)
        if verbose:
            yc, ec = y.double().cpu(), eager.double().cpu()
            fin = torch.isfinite(ref64) & torch.isfinite(yc) & torch.isfinite(ec)
            print(f"  {name:7s} ERR {err_finite(yc, ref64, fin):.3g} (eager {err_finite(ec, ref64, fin):.3g}, "
                  f"floor {FLOOR[dtype]:g}): {'ok' if not out[name] else out[name]}")
    return out


# --- training mode: BN with batch statistics, running-stat updates and gradients -------------------------------
def draw_train(seed):
    """An inference draw reused for training: no conv bias (a biased conv is not fused in training),
    BN buffers fp32 (fp64 for fp64), plus momentum (incl. None: cumulative average) and a start count."""
    cfg = dict(draw(seed), conv_bias=False)
    rnd = random.Random(seed + 7_000_000)
    cfg["bn_dtype"] = "float64" if cfg["dtype"] == "float64" else "float32"
    cfg["momentum"] = rnd.choice([0.1, None, 0.0, 1.0, round(rnd.uniform(0.0, 1.0), 4)])
    cfg["nbt0"] = rnd.choice([0, 0, 1, 5])
    return cfg


def _train_forward(cfg, x, w, gamma, beta, res, rm, rv, eps_dtype=None):
    """The unfused modules in training mode (the running buffers rm/rv are updated in place)."""
    nbt = cfg["nbt0"] + 1
    factor = (1.0 / nbt) if cfg["momentum"] is None else cfg["momentum"]
    y = F.conv2d(x, w, None, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"])
    y = F.batch_norm(y, rm, rv, gamma, beta, True, factor, cfg["eps"])
    if res is not None:
        y = y + res
    return y.relu() if cfg["relu"] else y


def run_seed_train(seed, device="cpu", backends_to_run=None, triton_macs=None, verbose=False):
    """Training-mode check of every backend on one seed: out, running stats, num_batches_tracked and
    the gradients of x, weight, gamma, beta (and residual) vs float64 autograd through the modules."""
    cfg = draw_train(seed)
    t, e = build(cfg, device)
    dtype = DTYPES[cfg["dtype"]]
    res_leaf = cfg["residual"] not in ("none", "expanded", "alias_x")

    def leaves(src, dev, dt=None):
        x = src["x"].detach().to(dev).requires_grad_()
        w = src["weight"].detach().to(dev).requires_grad_()
        g = src["gamma"].detach().to(dev).requires_grad_()
        b = src["beta"].detach().to(dev).requires_grad_()
        r = src["residual"]
        r = None if r is None else (r.detach().to(dev).requires_grad_() if res_leaf else r.detach().to(dev))
        if cfg["residual"] == "alias_x":
            r = x
        return x, w, g, b, r

    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(cfg["n"], cfg["k"], cfg["p"], cfg["q"], generator=gen, dtype=torch.float64)
    exact = dict(x=e["x"], weight=e["weight"], gamma=e["gamma"], beta=e["beta"], residual=e["residual"])
    mine = dict(x=t["x"], weight=t["weight"], gamma=t["bn"]["weight"], beta=t["bn"]["bias"], residual=t["residual"])

    def run_ref(src, dev, rm, rv):
        x, w, g, b, r = leaves(src, dev)
        out = _train_forward(cfg, x, w, g, b, r, rm, rv)
        out.backward(grad_out.to(dev, out.dtype))
        grads = [x.grad, w.grad, g.grad, b.grad] + ([r.grad] if res_leaf else [])
        return out.detach(), [None if v is None else v.detach() for v in grads]

    want = None
    try:
        run_ref(exact, "cpu", e["mean"].clone(), e["var"].clone())
    except ValueError as ex:  # one value per channel, or eps=0 in training
        want = str(ex)
    if want is not None:  # nn.BatchNorm2d refuses this call; so must every backend, with its message
        out = {}
        for name in backends_to_run or (backends.available_backends() + ["auto"]):
            try:
                x, w, g, b, r = leaves(mine, device)
                rk.fused_conv_bn_train(x, w, g, b, r, stride=cfg["stride"], padding=cfg["padding"],
                                       dilation=cfg["dilation"], groups=cfg["groups"], eps=cfg["eps"],
                                       relu=cfg["relu"], backend=name)
                out[name] = [f"no ValueError for one value per channel (the modules raise {want!r})"]
            except ValueError as ex:
                out[name] = [] if str(ex) == want else [f"ValueError {ex} != the modules' {want!r}"]
            except backends.BackendUnavailable:
                out[name] = []
        return out

    rm64, rv64 = e["mean"].clone(), e["var"].clone().clamp_min(1e-3)  # running buffers: any positive start
    ref_out, ref_grads = run_ref(exact, "cpu", rm64, rv64)
    rm_e, rv_e = t["bn"]["running_mean"].clone(), rv64.to(device, t["bn"]["running_var"].dtype)
    eager_out, eager_grads = run_ref(mine, device, rm_e, rv_e)
    macs = cfg["n"] * cfg["k"] * cfg["p"] * cfg["q"] * (cfg["c"] // cfg["groups"]) * cfg["r"] * cfg["s"]
    out = {}
    for name in backends_to_run or (backends.available_backends() + ["auto"]):
        x, w, g, b, r = leaves(mine, device)
        if name != "auto":
            ok, why = backends.supports_train(name, x, w, cfg["groups"])
            if not ok:
                try:
                    rk.fused_conv_bn_train(x, w, g, b, r, stride=cfg["stride"], padding=cfg["padding"],
                                           dilation=cfg["dilation"], groups=cfg["groups"], relu=cfg["relu"],
                                           backend=name)
                    out[name] = [f"backend {name!r} cannot train this call ({why}) but did not raise"]
                except backends.BackendUnavailable:
                    out[name] = []
                continue
            if name == "triton" and x.device.type == "cpu" and triton_macs is not None and macs > triton_macs:
                out[name] = ["skipped: too large for the Triton interpreter"]
                continue
        rm = t["bn"]["running_mean"].clone()
        rv = rv64.to(device, t["bn"]["running_var"].dtype)
        nbt = torch.tensor(cfg["nbt0"], device=device)
        y = rk.fused_conv_bn_train(x, w, g, b, r, running_mean=rm, running_var=rv, num_batches_tracked=nbt,
                                   momentum=cfg["momentum"], eps=cfg["eps"], stride=cfg["stride"],
                                   padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"],
                                   relu=cfg["relu"], backend=name)
        y.backward(grad_out.to(device, y.dtype))
        grads = [x.grad, w.grad, g.grad, b.grad] + ([r.grad] if res_leaf else [])
        problems = [f"out: {p}" for p in compare(y.detach(), ref_out, eager_out, t["x"], dtype)]
        for label, gv, want, eg in zip(("dx", "dweight", "dgamma", "dbeta", "dresidual"), grads, ref_grads,
                                       eager_grads):
            if gv is None or tuple(gv.shape) != tuple(want.shape):
                problems.append(f"{label}: missing or wrong shape")
                continue
            # gradients carry x's precision (an fp32 residual's gradient comes from the fp16 output)
            problems += [f"{label}: {p}" for p in compare(gv, want, eg, gv, gv.dtype, False, FLOOR[dtype])]
        if int(nbt) != cfg["nbt0"] + 1:
            problems.append(f"num_batches_tracked {int(nbt)} != {cfg['nbt0'] + 1}")
        for label, got, want, eg in (("running_mean", rm, rm64, rm_e), ("running_var", rv, rv64, rv_e)):
            problems += [f"{label}: {p}" for p in compare(got, want, eg, got, got.dtype, False, FLOOR[dtype])]
        out[name] = problems
        if verbose:
            print(f"  {name:7s} {'ok' if not problems else problems}")
    return out


# ==================================================================================================
# pytest
# ==================================================================================================
TIER = os.environ.get("RESNET_KERNELS_FUZZ", "fast")
_LONG = TIER == "long"
_DEVICE = "cuda" if _LONG and torch.cuda.is_available() else "cpu"
SEEDS = ([LONG_BASE + i for i in range(int(os.environ.get("RESNET_KERNELS_FUZZ_SEEDS", "3000")))] if _LONG
         else list(range(FAST_SEEDS)))
_DEADLINE = [None]


def _pinned_triton_config():
    """On a GPU: run the Triton kernel with the tile config the seed drew instead of autotuning every
    new shape (which compiles and times all configs: most of a run's time). None on the interpreter
    (it always runs one config)."""
    import contextlib
    import importlib
    if _DEVICE != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    tk = importlib.import_module("resnet_kernels.triton.conv_bn_act")
    if not all(hasattr(tk, a) for a in ("_autotuned_kernel", "_conv_bn_act_heur", "CONFIGS")):
        return None  # internals changed: the real autotuner (slower, still a check)

    @contextlib.contextmanager
    def pin(cfg):
        conf = tk.CONFIGS[cfg["triton_config"] % len(tk.CONFIGS)]

        class Pinned:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    return tk._conv_bn_act_heur[grid](*args, **kw, **conf)
                return launch

        original = tk._autotuned_kernel
        tk._autotuned_kernel = lambda: Pinned()
        try:
            yield
        finally:
            tk._autotuned_kernel = original
    return pin


def _time_is_up(share):
    """RESNET_KERNELS_FUZZ_SECONDS: True once `share` of it has passed since the first fuzz seed ran."""
    limit = os.environ.get("RESNET_KERNELS_FUZZ_SECONDS")
    if not limit:
        return False
    if _DEADLINE[0] is None:
        _DEADLINE[0] = time.monotonic()
    return time.monotonic() - _DEADLINE[0] > share * float(limit)


def _repro_hint(seed):
    dev = " --device cuda" if _DEVICE == "cuda" else ""
    return f"reproduce: python tests/test_fuzz.py --seed {seed}{dev}   (standalone: --repro {seed})"


def _check_seed(seed):
    import pytest
    if _time_is_up(0.65):  # the inference seeds get 65% of the time box, training seeds the rest
        pytest.skip(f"RESNET_KERNELS_FUZZ_SECONDS={os.environ.get('RESNET_KERNELS_FUZZ_SECONDS')} used up")
    results = run_seed(seed, _DEVICE, triton_macs=None if _DEVICE == "cuda" else TRITON_INTERP_MACS,
                       triton_config=_pinned_triton_config())
    bad = {name: p for name, p in results.items() if p and not p[0].startswith("skipped")}
    assert not bad, f"seed {seed}: {draw(seed)}\n" + "\n".join(f"  {n}: {p}" for n, p in bad.items()) + \
        "\n" + _repro_hint(seed)


def test_fuzz(seed):
    _check_seed(seed)


TRAIN_SEEDS = SEEDS[:len(SEEDS) // 2] if _LONG else list(range(FAST_TRAIN_SEEDS))


def test_fuzz_train(train_seed):
    """Training mode on the same draws: output, running statistics, num_batches_tracked and the
    gradients vs float64 autograd through the modules; nn.BatchNorm2d's refusals (one value per
    channel, eps <= 0) must be raised with its message."""
    import pytest
    if _time_is_up(1.0):
        pytest.skip(f"RESNET_KERNELS_FUZZ_SECONDS={os.environ.get('RESNET_KERNELS_FUZZ_SECONDS')} used up")
    results = run_seed_train(train_seed, _DEVICE, triton_macs=None if _DEVICE == "cuda" else TRITON_INTERP_MACS)
    bad = {name: p for name, p in results.items() if p and not p[0].startswith("skipped")}
    dev = " --device cuda" if _DEVICE == "cuda" else ""
    assert not bad, f"train seed {train_seed}: {draw_train(train_seed)}\n" + "\n".join(
        f"  {n}: {p}" for n, p in bad.items()) + \
        f"\nreproduce: python tests/test_fuzz.py --train --seed {train_seed}{dev}"


def pytest_generate_tests(metafunc):  # ids "seed=N": `pytest -k "seed=17]"` reruns one
    if "seed" in metafunc.fixturenames:
        metafunc.parametrize("seed", SEEDS, ids=[f"seed={s}" for s in SEEDS])
    if "train_seed" in metafunc.fixturenames:
        metafunc.parametrize("train_seed", TRAIN_SEEDS, ids=[f"seed={s}" for s in TRAIN_SEEDS])


def test_fuzz_space_is_covered():
    """The fast tier's draws really contain every dimension the issue asks for (a fuzzer whose space
    silently shrank would pass without testing anything)."""
    cfgs = [draw(s) for s in range(FAST_SEEDS)]  # the fast tier's space (the long tier draws a superset)
    seen = lambda key: {str(c[key]) for c in cfgs}  # noqa: E731
    assert seen("dtype") == {"float32", "float16", "bfloat16", "float64"}
    assert {"1", "3", "5", "7"} <= seen("r")
    assert {"nchw", "channels_last", "strided", "permuted"} <= seen("x_layout")
    assert {"none", "nchw", "channels_last", "transposed", "channel_slice", "expanded", "alias_x"} <= seen("residual")
    assert {"True", "False"} <= seen("relu") and {"True", "False"} <= seen("residual_fp32")
    assert {"functional", "module"} <= seen("entry") and "True" in seen("conv_bias")
    assert "0.0" in seen("eps") and "0.1" in seen("eps")
    assert any(c["groups"] > 1 and c["groups"] < c["c"] for c in cfgs)
    assert any(c["groups"] == c["c"] > 1 for c in cfgs)
    assert any(c["c"] % 8 and c["k"] % 8 for c in cfgs)
    assert any(c["p"] == c["q"] == 1 for c in cfgs) and any(c["h"] == c["w"] == 1 for c in cfgs)
    assert any(c["h"] % 2 and c["h"] > 1 for c in cfgs)
    assert any(c["stride"] != (1, 1) for c in cfgs) and any(c["dilation"] != (1, 1) for c in cfgs)
    assert any(c["zero_var"] and c["eps"] == 0.0 for c in cfgs)
    assert any(c["zero_gamma"] for c in cfgs) and any(c["nonfinite_x"] for c in cfgs)
    assert {str((-10.0, -4.0)), str((4.0, 10.0))} <= seen("var_log10")
    if not _LONG and "triton" in backends.available_backends():
        small = [c for c in cfgs if c["n"] * c["k"] * c["p"] * c["q"] * (c["c"] // c["groups"]) * c["r"] * c["s"]
                 <= TRITON_INTERP_MACS and c["groups"] == 1 and c["dtype"] != "float64"]
        assert len(small) >= 60, len(small)  # the interpreter really runs a broad sample


def test_eps0_var0_channels_propagate_like_the_reference():
    """eps=0 with var=0: the reference's scale is +-inf (NaN with gamma=0), so channels become
    +-inf/NaN by the sign of (y - mean) * gamma. The fused op must give the same non-finite values
    at the same positions, on every backend, never a silently finite channel."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    w = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64) / 6
    var = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    mean = torch.tensor([0.5, 0.0, -0.2, 0.1], dtype=torch.float64)
    gamma = torch.tensor([1.0, -2.0, 0.0, 1.0], dtype=torch.float64)
    beta = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    ref = F.batch_norm(F.conv2d(x, w, None, 1, 1), mean, var, gamma, beta, False, 0.0, 0.0)
    assert torch.isnan(ref[:, 2]).all() and torch.isnan(ref[:, 1]).all()  # 0 * inf, and mean 0: 0 * inf
    assert (ref[:, 0].abs() == math.inf).any() and torch.isfinite(ref[:, 3]).all()
    for name in backends.available_backends():
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            if not backends.supports(name, x.to(dtype), w.to(dtype), 1)[0]:
                continue
            for fmt in (torch.contiguous_format, torch.channels_last):
                sdt = torch.float64 if dtype == torch.float64 else torch.float32
                scale, shift = rk.fold_bn(gamma.to(sdt), beta.to(sdt), mean.to(sdt), var.to(sdt), 0.0)
                xd = x.to(dtype).contiguous(memory_format=fmt)
                y = rk.fused_conv_bn_act(xd, w.to(dtype), scale, shift, padding=1, relu=False, backend=name)
                ref_d = F.batch_norm(F.conv2d(xd.double(), w.to(dtype).double(), None, 1, 1), mean, var, gamma, beta,
                                     False, 0.0, 0.0)
                assert compare(y, ref_d, ref_d, xd, dtype) == [], (name, dtype, fmt)


# ==================================================================================================
# command line: run a seed, or print a standalone reproducer
# ==================================================================================================
_STANDALONE = (draw, _layout, build, oracle, unfused, call, err_finite, compare, run_seed)


def standalone_source(seed, device="cpu"):
    import inspect
    parts = [f'"""Standalone reproducer for resnet_kernels fuzz seed {seed} (generated by tests/test_fuzz.py).',
             "", f"Run: python this_file.py   (device {device!r}; prints each backend's error vs float64)", '"""',
             "import math", "import os", "import random", "", "import torch", "import torch.nn as nn",
             "import torch.nn.functional as F", "",
             "if not torch.cuda.is_available():", "    os.environ.setdefault('TRITON_INTERPRET', '1')",
             "import resnet_kernels as rk  # noqa: E402", "from resnet_kernels import backends  # noqa: E402", "",
             "torch.backends.cudnn.allow_tf32 = False", "torch.backends.cuda.matmul.allow_tf32 = False", "",
             "FLOOR = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}",
             'DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, '
             '"float64": torch.float64}', ""]
    for fn in _STANDALONE:
        parts += ["", inspect.getsource(fn)]
    parts += ["", 'if __name__ == "__main__":', f"    print({draw(seed)!r})",
              f"    res = run_seed({seed}, device={device!r}, verbose=True)",
              "    bad = {n: p for n, p in res.items() if p and not p[0].startswith('skipped')}",
              "    print('WRONG:' if bad else 'all backends agree with the float64 oracle', bad or '')",
              "    raise SystemExit(1 if bad else 0)", ""]
    return "\n".join(parts)


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--seed", type=int, help="run one seed on every available backend and print the result")
    group.add_argument("--repro", type=int, metavar="SEED", help="print a standalone reproducer script for SEED")
    ap.add_argument("--train", action="store_true", help="the training-mode check of the seed (with --seed)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    a = ap.parse_args(argv)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if a.repro is not None:
        print(standalone_source(a.repro, a.device))
        return 0
    if a.train:
        print(draw_train(a.seed))
        res = run_seed_train(a.seed, a.device, verbose=True)
    else:
        print(draw(a.seed))
        res = run_seed(a.seed, a.device, verbose=True)
    bad = {n: p for n, p in res.items() if p and not p[0].startswith("skipped")}
    print("WRONG:" if bad else "all backends agree with the float64 oracle", bad or "")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
