#!/usr/bin/env python
"""Smoke test of an *installed* resnet_kernels (a wheel or an sdist install), run by the workflows.

    python scripts/smoke_test.py [--expect-cuda | --expect-cpu-only] [--archs "8.0;9.0a"] [--require-gpu]

Checks, printing one line each and exiting non-zero when any fails:
  1. the package imports from an installation, not from a source tree (a checkout on sys.path, the
     current directory, or an editable install would make the rest prove nothing);
  2. its backends and their status (what `python -m resnet_kernels info` prints);
  3. the C++ extension loaded and registered every op schema (torch.ops.resnet_kernels.*), with the
     build flags asked for (--expect-cuda: CUDA kernels registered for the CUDA dispatch key, and
     --archs in build_info);
  4. conv + BN + residual + ReLU through the public op, on CPU and, where a GPU is visible, with every
     available backend on it, against a float64 reference computed here with plain torch ops.
Run it from any directory; it never imports anything from the checkout it lives in.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys

OPS = ("conv_bn_act", "bn_act_epilogue_", "conv_bn_train", "bn_act_train_backward", "bn_update_running_stats_",
       "build_info")
CUDA_OPS = ("conv_bn_act_cuda",)  # registered for the CUDA key by csrc/cuda/conv_bn_act.cu

# The tolerance rule of the test suite (tests/conftest.py): within 2x PyTorch's own unfused error
# in that dtype, or the dtype's floor.
FLOOR = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}


class Report:
    def __init__(self):
        self.failed = []

    def ok(self, what):
        print(f"[smoke] ok    {what}", flush=True)

    def fail(self, what):
        print(f"[smoke] FAIL  {what}", flush=True)
        self.failed.append(what)

    def check(self, cond, what):
        (self.ok if cond else self.fail)(what)
        return cond


def _source_tree_of(path):
    """The checkout `path` lies in (a folder with setup.py and csrc/ops.cpp), or None."""
    d = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.isfile(os.path.join(d, "setup.py")) and os.path.isfile(os.path.join(d, "csrc", "ops.cpp")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def check_install_location(rep, rk):
    pkg = os.path.dirname(os.path.abspath(rk.__file__))
    tree = _source_tree_of(pkg)
    if tree is None:
        rep.ok(f"imported from an installation: {pkg}")
    else:
        rep.fail(f"imported from the source tree {tree} ({pkg}); install the package and run from outside the tree")
    try:
        dist = importlib.metadata.distribution("resnet_kernels")
    except importlib.metadata.PackageNotFoundError:
        rep.fail("no installed distribution metadata for resnet_kernels (imported from a bare folder?)")
        return
    direct = dist.read_text("direct_url.json")
    editable = bool(direct) and json.loads(direct).get("dir_info", {}).get("editable", False)
    rep.check(not editable, f"installed distribution resnet_kernels {dist.version} is not an editable install")
    rep.check(dist.version == rk.__version__.split("+")[0] or dist.version.split("+")[0] == rk.__version__,
              f"distribution version {dist.version} matches the package's __version__ {rk.__version__}")


def check_ops(rep, rk, args):
    import torch

    loaded, why = rk._C_STATUS
    if not rep.check(loaded, f"extension resnet_kernels._C loaded ({why})"):
        return
    so = getattr(sys.modules.get("resnet_kernels._C"), "__file__", "?")
    print(f"[smoke]       _C: {so}")
    for name in OPS:
        op = getattr(torch.ops.resnet_kernels, name, None)
        rep.check(op is not None and hasattr(op, "default"), f"op torch.ops.resnet_kernels.{name} registered")
    rep.check(torch._C._dispatch_has_kernel_for_dispatch_key("resnet_kernels::conv_bn_act", "CPU"),
              "conv_bn_act has a CPU kernel")
    info = torch.ops.resnet_kernels.build_info()
    print(f"[smoke]       build_info: {info}")
    head, _, archs = info.partition("archs=")  # the arch list itself contains ';', and comes last
    fields = dict(kv.split("=", 1) for kv in head.split(";") if "=" in kv)
    if archs:
        fields["archs"] = archs
    if args.expect_cuda:
        rep.check(fields.get("cuda") == "1", "built with the CUDA kernels (build_info cuda=1)")
        for name in CUDA_OPS:
            rep.check(hasattr(torch.ops.resnet_kernels, name) and torch._C._dispatch_has_kernel_for_dispatch_key(
                f"resnet_kernels::{name}", "CUDA"), f"{name} has a CUDA kernel registered")
        if args.archs:
            rep.check(fields.get("archs") == args.archs, f"built for archs {args.archs} (build_info archs="
                      f"{fields.get('archs')})")
    if args.expect_cpu_only:
        rep.check(fields.get("cuda") == "0", "built without CUDA kernels (build_info cuda=0)")


def _case(device, dtype, channels_last, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    n, c, h, w, k = 2, 24, 11, 9, 32  # odd spatial sizes: every tail mask is exercised
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, 3, 3, generator=g) / (c * 9) ** 0.5
    gamma = torch.rand(k, generator=g) * 2.5 - 1.0
    beta = torch.randn(k, generator=g) * 0.3
    mean = torch.randn(k, generator=g) * 0.5
    var = torch.rand(k, generator=g) * 1.5 + 0.25
    residual = torch.randn(n, k, h, w, generator=g)
    ref = torch.nn.functional.conv2d(x.double(), weight.double(), padding=1)
    scale64 = gamma.double() / torch.sqrt(var.double() + 1e-5)
    shift64 = beta.double() - mean.double() * scale64
    ref = torch.relu(ref * scale64.view(1, -1, 1, 1) + shift64.view(1, -1, 1, 1) + residual.double())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    residual = residual.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    weight = weight.to(device=device, dtype=dtype)
    bn = [t.to(device) for t in (gamma, beta, mean, var)]
    return x, weight, bn, residual, ref


def _err(y, ref):
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    return ((y - ref).abs().max() / (ref.abs().max() + 1e-6)).item()


def check_numerics(rep, rk, device, backends, dtype_name):
    import torch

    dtype = getattr(torch, dtype_name)
    for backend in backends:
        x, weight, (gamma, beta, mean, var), residual, ref = _case(device, dtype, channels_last=True)
        scale, shift = rk.fold_bn(gamma, beta, mean, var, 1e-5)
        unfused = torch.relu(torch.nn.functional.conv2d(x, weight, padding=1) * scale.to(dtype).view(1, -1, 1, 1)
                             + shift.to(dtype).view(1, -1, 1, 1) + residual)
        bound = max(FLOOR[dtype_name], 2.0 * _err(unfused, ref))
        what = f"conv_bn_act backend={backend} on {device} ({dtype_name}, channels_last, residual, ReLU)"
        try:
            y = rk.fused_conv_bn_act(x, weight, scale, shift, residual, stride=1, padding=1, relu=True,
                                     backend=backend)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # any failure of a listed backend is a smoke-test failure
            rep.fail(f"{what}: raised {type(e).__name__}: {e}")
            continue
        if not rep.check(tuple(y.shape) == tuple(ref.shape) and y.dtype == dtype and y.device.type == device,
                         f"{what}: output {tuple(y.shape)} {y.dtype} on {y.device}"):
            continue
        e = _err(y, ref)
        rep.check(bool(torch.isfinite(y).all()) and e <= bound,
                  f"{what}: error vs float64 {e:.2e} (bound {bound:.2e}, unfused {_err(unfused, ref):.2e})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--expect-cuda", action="store_true", help="the build must contain the CUDA kernels")
    kind.add_argument("--expect-cpu-only", action="store_true", help="the build must not contain CUDA kernels")
    ap.add_argument("--archs", help='with --expect-cuda: the arch list build_info must report, e.g. "8.0;9.0a"')
    ap.add_argument("--require-gpu", action="store_true", help="fail when no CUDA GPU is visible (GPU runners)")
    args = ap.parse_args(argv)

    # A script's own folder is sys.path[0]; drop it and the current directory so only the installed
    # package can be found (the location check below verifies it).
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if p not in ("", ".", here, os.getcwd())]

    rep = Report()
    try:
        import torch

        import resnet_kernels as rk
        from resnet_kernels.__main__ import info
    except Exception as e:
        print(f"[smoke] FAIL  import resnet_kernels: {type(e).__name__}: {e}")
        return 1
    print(f"[smoke] python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}")
    # IEEE fp32 everywhere (as the test suite): TF32 would blur the fp32 comparison on a GPU.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    check_install_location(rep, rk)
    info()  # backends and why one is unavailable, device, versions, build flags
    check_ops(rep, rk, args)

    avail = rk.available_backends()
    print(f"[smoke]       available backends: {avail}")
    check_numerics(rep, rk, "cpu", ["torch"] + (["triton"] if "triton" in avail and
                                                os.environ.get("TRITON_INTERPRET") == "1" else []), "float32")
    if torch.cuda.is_available():
        print(f"[smoke]       GPU: {torch.cuda.get_device_name()}")
        gpu_backends = [b for b in avail if b in ("cuda", "triton", "torch")]
        if args.expect_cuda:
            rep.check("cuda" in gpu_backends, f"the cuda backend is available on this GPU ({avail})")
        check_numerics(rep, rk, "cuda", gpu_backends, "float16")
        check_numerics(rep, rk, "cuda", [b for b in gpu_backends if b != "cuda"], "float32")
    elif args.require_gpu:
        rep.fail("--require-gpu: torch.cuda.is_available() is False on this runner")
    else:
        print("[smoke]       no CUDA GPU visible: the GPU backends are not exercised here")

    if rep.failed:
        print(f"[smoke] {len(rep.failed)} check(s) FAILED")
        return 1
    print("[smoke] all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
