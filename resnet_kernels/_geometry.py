"""Shape, layout and argument rules shared by every backend and the fake kernel.

One function decides the output's shape and memory format, so the fake kernel and all real
kernels agree stride for stride.
"""
from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def pair(v, name):
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    if len(v) == 1:
        return (v[0], v[0])
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v}")
    return v


def out_hw(h, w, r, s, stride, padding, dilation):
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x is laid out NHWC; ambiguous layouts (C == 1 or H*W == 1) count as NCHW."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def out_memory_format(x: torch.Tensor):
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def canonical_strides(shape, memory_format):
    n, c, h, w = shape
    if memory_format == torch.channels_last:
        return (h * w * c, 1, w * c, c)
    return (c * h * w, h * w, w, 1)


def as_canonical(y: torch.Tensor, memory_format) -> torch.Tensor:
    """y laid out in `memory_format` with exactly the strides torch.empty would give it (free
    when only the strides of size-1 dims differ), so real kernels match the fake kernel."""
    y = y.contiguous(memory_format=memory_format)
    strides = canonical_strides(tuple(y.shape), memory_format)
    if y.stride() != strides:
        y = y.as_strided(y.shape, strides) if y.is_contiguous(memory_format=memory_format) else y.contiguous(memory_format=memory_format)
    return y


def check_args(x, weight, scale, shift, residual, stride, padding, dilation, groups):
    """Validate a conv_bn_act call; return (output shape, output memory format).

    Errors name the argument and the rule. Works on real and fake tensors.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got {_desc(x)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D tensor [K, C/groups, R, S], got {_desc(weight)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    if c % groups != 0 or k % groups != 0:
        raise ValueError(f"groups={groups} must divide x's channels C={c} and weight's K={k}")
    if cg * groups != c:
        raise ValueError(f"x has C={c} channels but weight of shape {list(weight.shape)} with groups={groups} "
                         f"expects C={cg * groups} (x.shape[1] must equal weight.shape[1] * groups)")
    if any(v < 1 for v in stride) or any(v < 1 for v in dilation) or any(v < 0 for v in padding):
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got stride={list(stride)}, "
                         f"padding={list(padding)}, dilation={list(dilation)}")
    p, q = out_hw(h, w, r, s, stride, padding, dilation)
    if p < 1 or q < 1:
        raise ValueError(f"x's spatial size {h}x{w} is too small for a {r}x{s} filter with padding={list(padding)}, "
                         f"dilation={list(dilation)} (output would be {p}x{q})")
    want_sdt = (torch.float64,) if x.dtype == torch.float64 else (torch.float32,)
    for name, t in (("scale", scale), ("shift", shift)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != k:
            raise ValueError(f"{name} must be a 1-D tensor of the K={k} output channels, got {_desc(t)}")
        if t.dtype not in want_sdt:
            raise TypeError(f"{name} must be {want_sdt[0]} (BN constants stay in full precision), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    shape = (n, k, p, q)
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != shape:
            raise ValueError(f"residual must have the output's shape {list(shape)}, got {_desc(residual)}")
        if not residual_dtype_ok(x.dtype, residual.dtype):
            raise TypeError(f"residual must have x's dtype {x.dtype}"
                            f"{' (or float32, added in fp32)' if x.dtype in _LOW else ''}, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual must be on x's device {x.device}, got {residual.device}")
    return shape, out_memory_format(x)


_LOW = (torch.float16, torch.bfloat16)


def residual_dtype_ok(x_dtype, r_dtype):
    """x's dtype, or float32 for fp16/bf16 x: the epilogue adds in fp32, and under autocast a
    block's fp32 shortcut (torchvision adds it to the low-precision BN output in fp32) keeps its
    precision instead of being rounded first."""
    return r_dtype == x_dtype or (x_dtype in _LOW and r_dtype == torch.float32)


def _desc(t):
    if isinstance(t, torch.Tensor):
        return f"a {t.dim()}-D {t.dtype} tensor of shape {list(t.shape)} on {t.device}"
    return f"{type(t).__name__} {t!r}"
