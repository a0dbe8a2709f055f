"""Functional entry points: pick a backend, fold BatchNorm, call the op."""
from __future__ import annotations

import torch

from . import backends, ops
from ._geometry import check_args, pair


def fused_conv_bn_act(x, weight, scale, shift, residual=None, *, stride=1, padding=0, dilation=1, groups=1,
                      relu=True, backend="auto"):
    """y = relu?(conv2d(x, weight) * scale[k] + shift[k] + residual).

    x: [N, C, H, W] (NCHW or channels_last; the output follows x's memory format).
    weight: [K, C/groups, R, S], x's dtype. scale, shift: fp32 [K] (fp64 for fp64 x).
    residual: None or a tensor of the output's shape [N, K, P, Q], any strides.
    backend: "auto" (fastest available that supports the call), or "torch", "triton", "cuda"
    (raise BackendUnavailable when that backend cannot serve the call).
    """
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int or a pair of ints, got the string mode {padding!r}")
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    check_args(x, weight, scale, shift, residual, stride, padding, dilation, groups)
    name = backends.resolve(backend, x, weight, groups)
    return ops.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, name)


def fold_bn(weight, bias, running_mean, running_var, eps, conv_bias=None):
    """(scale, shift) of an eval-mode BatchNorm, fp32 (fp64 when the inputs are fp64).

    scale = gamma / sqrt(var + eps), shift = beta - mean * scale (+ conv_bias * scale), computed in
    float64 so that fp16 statistics (var of 1e5 or 1e-7) neither overflow nor flush to zero.
    weight/bias None mean affine=False (gamma=1, beta=0). Differentiable in weight and bias.
    """
    out_dtype = torch.float64 if running_var.dtype == torch.float64 else torch.float32
    var = running_var.double()
    inv = torch.rsqrt(var + eps)
    scale = inv if weight is None else weight.double() * inv
    shift = -running_mean.double() * scale
    if conv_bias is not None:
        shift = shift + conv_bias.double() * scale
    if bias is not None:
        shift = shift + bias.double()
    return scale.to(out_dtype), shift.to(out_dtype)
