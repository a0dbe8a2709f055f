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
    stride, padding, dilation = _front_checks(x, weight, scale, shift, residual, stride, padding, dilation,
                                              groups, relu)
    # The op validates everything else (its real and fake kernels share check_args).
    try:
        name = backends.resolve(backend, x, weight, groups,
                                call=(scale, shift, residual, stride, padding, dilation, groups, relu))
    except backends.BackendUnavailable:
        check_args(x, weight, scale, shift, residual, stride, padding, dilation, groups)  # a bad argument first
        raise
    if not torch.compiler.is_compiling() and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, scale, shift, residual)):
        from .reference import caching_disabled
        with caching_disabled():  # weights may change between calls without a version bump
            return ops.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, name)
    return ops.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, name)


def fold_bn(weight, bias, running_mean, running_var, eps, conv_bias=None):
    """(scale, shift) of an eval-mode BatchNorm, fp32 (fp64 when the inputs are fp64).

    scale = gamma / sqrt(var + eps), shift = beta - (mean - conv_bias) * scale, computed in fp32
    (fp64 for fp64 statistics) so that fp16 statistics (var of 1e5 or 1e-7) neither overflow nor
    flush to zero; fp32 rounding here is ~1e-7 relative, far below any dtype's tolerance.
    weight/bias None mean affine=False (gamma=1, beta=0). Differentiable in weight and bias.
    """
    dt = torch.float64 if running_var.dtype == torch.float64 else torch.float32
    as_dt = lambda t: t if t.dtype == dt else t.to(dt)  # noqa: E731  (skip no-op dispatches: hot path)
    scale = torch.rsqrt(as_dt(running_var) + eps)
    if weight is not None:
        scale = scale * as_dt(weight)
    mean = as_dt(running_mean)
    if conv_bias is not None:
        mean = mean - as_dt(conv_bias)
    shift = -mean * scale if bias is None else torch.addcmul(as_dt(bias), mean, scale, value=-1.0)
    return scale, shift


def fused_conv_bn_train(x, weight, gamma, beta, residual=None, *, running_mean=None, running_var=None,
                        num_batches_tracked=None, momentum=0.1, eps=1e-5, update_running_stats=True, stride=1,
                        padding=0, dilation=1, groups=1, relu=True, backend="auto"):
    """Training-mode act(BN(conv(x, weight)) + residual), BN with batch statistics.

    The same semantics as nn.BatchNorm2d in training mode: normalise with the batch's biased
    variance; when `update_running_stats` and running buffers are given, update them with the
    unbiased variance and `momentum` (None: cumulative average over `num_batches_tracked`, which
    is incremented first). gamma/beta None mean affine=False. Differentiable in x, weight, gamma,
    beta and residual. Returns out (x's dtype and memory format).
    """
    stride, padding, dilation = _front_checks(x, weight, None, None, residual, stride, padding, dilation,
                                              groups, relu)
    try:
        name = backends.resolve_train(backend, x, weight, groups,
                                      call=(gamma, beta, residual, stride, padding, dilation, groups, eps, relu))
    except backends.BackendUnavailable:
        ops._check_train(x, weight, gamma, beta, residual, stride, padding, dilation, groups)  # a bad argument first
        raise
    out, y, mean, var = ops.conv_bn_train(x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps,
                                          relu, name)
    if update_running_stats and running_mean is not None and running_var is not None:
        _check_running_stats(running_mean, running_var, num_batches_tracked, out)
        count = y.numel() // max(y.shape[1], 1)
        with torch.no_grad():
            if count == 0:  # nn.BatchNorm2d: an empty batch is counted but changes no statistic
                if num_batches_tracked is not None:
                    num_batches_tracked.add_(1)
            else:
                ops.bn_update_running_stats_(running_mean, running_var, num_batches_tracked, mean.detach(),
                                             var.detach(), count, momentum)
    return out


def _check_running_stats(running_mean, running_var, num_batches_tracked, out):
    k = out.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != k:
            raise ValueError(f"{name} must be a 1-D tensor of the K={k} output channels, got "
                             f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != out.device:
            raise ValueError(f"{name} must be on x's device {out.device}, got {t.device}")
    if num_batches_tracked is not None and (not isinstance(num_batches_tracked, torch.Tensor)
                                            or num_batches_tracked.numel() != 1
                                            or num_batches_tracked.device != out.device):
        raise ValueError("num_batches_tracked must be None or a one-element tensor on x's device, got "
                         f"{num_batches_tracked!r:.80}")


def _front_checks(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    """The checks both functional entry points make before resolving a backend; returns the
    (stride, padding, dilation) pairs. Everything else is the op's check_args (real and fake kernels)."""
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int or a pair of ints, got the string mode {padding!r}")
    if not isinstance(relu, (bool, int)) or relu not in (0, 1):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__} {relu!r:.40}")
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        check_args(x, weight, scale, shift, residual, stride, padding, dilation, groups)  # raises, naming it
    return stride, padding, dilation
