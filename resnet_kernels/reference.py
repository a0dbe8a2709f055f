"""The `torch` backend: conv_bn_act as a composite of ATen ops.

This is the CPU default and the portable path everywhere. On CPU it is made fast by running the
convolution in channels_last through oneDNN with the BN folded into the convolution's weight and
bias (fp32/fp64 only, where folding is exact to a rounding), then the residual add and ReLU in
place on the convolution's own output: one pass over memory instead of four.

Measured on the 2-core CI machine (scripts in benchmarks/): oneDNN's fused post-op entry points
(`mkldnn._convolution_pointwise` with add/relu) were no faster than conv-with-bias plus two
in-place epilogue ops, so the simpler path is kept.

fp16/bf16 keep BN as an fp32 epilogue: folding a scale spread over 1e-4..1e3 into low-precision
weights loses accuracy or overflows.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ._geometry import as_canonical, out_memory_format

_FOLD_DTYPES = (torch.float32, torch.float64)


def _folded_weight(weight, scale, memory_format):
    """weight * scale per output channel, in the layout of the input, or None if that overflows.

    Folded on every call, never cached: BN's running-stat update in training mode and writes
    through `.data` leave tensor version counters unchanged, so a cache could serve a stale weight.
    """
    folded = (weight * scale.to(weight.dtype).view(-1, 1, 1, 1)).contiguous(memory_format=memory_format)
    if not bool(torch.isfinite(folded).all()) and bool(torch.isfinite(weight).all()):
        return None  # the fold overflows: keep BN as an epilogue for this weight
    return folded


_EPILOGUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def _cuda_epilogue_registered():
    """True when this build has a CUDA kernel for resnet_kernels::bn_act_epilogue_."""
    ns = getattr(torch.ops, "resnet_kernels", None)
    if ns is None or not hasattr(ns, "bn_act_epilogue_"):
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("resnet_kernels::bn_act_epilogue_", "CUDA")
    except (AttributeError, RuntimeError):
        return False


def _use_cuda_epilogue(y, scale, shift, residual):
    """Whether to apply BN + residual + ReLU with the CUDA epilogue op. Opt-in
    (RESNET_KERNELS_CUDA_EPILOGUE=1) until verified on a GPU; never where autograd would have
    to see through the in-place op (it has no autograd formula of its own)."""
    if os.environ.get("RESNET_KERNELS_CUDA_EPILOGUE") != "1" or not _cuda_epilogue_registered():
        return False
    if y.dtype not in _EPILOGUE_DTYPES or scale.dtype != torch.float32 or shift.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (y, scale, shift, residual)):
        return False
    return True


def conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    """y = act(conv(x, weight) * scale + shift + residual); output follows x's memory format."""
    fmt = out_memory_format(x)
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    folded = _folded_weight(weight, scale, fmt) if x.dtype in _FOLD_DTYPES else None
    if folded is not None:
        y = F.conv2d(x, folded, shift.to(x.dtype), stride, padding, dilation, groups)
        y = as_canonical(y, fmt)
        if residual is not None:
            y.add_(residual)
        if relu:
            y.relu_()
        return y
    # BN as an fp32 epilogue on the low-precision convolution (fp32 accumulation inside it).
    w = weight if weight.is_contiguous(memory_format=fmt) else weight.contiguous(memory_format=fmt)
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    if y.is_cuda and _use_cuda_epilogue(y, scale, shift, residual):
        # One in-place pass over y (csrc/cuda/epilogue.cu) instead of an fp32 temporary.
        y = as_canonical(y, fmt)
        torch.ops.resnet_kernels.bn_act_epilogue_(y, scale, shift, residual, relu)
        return as_canonical(y, fmt)
    acc = torch.empty(y.shape, dtype=scale.dtype, device=y.device, memory_format=fmt)
    torch.mul(y, scale.view(1, -1, 1, 1), out=acc)
    acc.add_(shift.view(1, -1, 1, 1))
    if residual is not None:
        acc.add_(residual)
    if relu:
        acc.relu_()
    return as_canonical(acc.to(x.dtype), fmt)
