"""The Python side of the torch.library ops: implementations, fake kernel, autograd, autocast.

The schemas live in csrc/ops.cpp (TORCH_LIBRARY). When the C++ extension is missing (a pure
Python install) the same schema is defined here so everything but the `cuda` backend works.
This is the only module that spells `torch.ops.resnet_kernels`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _C_STATUS, backends
from ._geometry import check_args

NAMESPACE = "resnet_kernels"
SCHEMAS = {  # the same text as csrc/ops.cpp (used only when the C++ extension is missing)
    "conv_bn_act": "conv_bn_act(Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor? residual, "
                   "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, str backend) -> Tensor",
    "conv_bn_train": "conv_bn_train(Tensor x, Tensor weight, Tensor? gamma, Tensor? beta, Tensor? residual, "
                     "int[2] stride, int[2] padding, int[2] dilation, int groups, float eps, bool relu, str backend) "
                     "-> (Tensor out, Tensor y, Tensor mean, Tensor var)",
    "bn_act_train_backward": "bn_act_train_backward(Tensor grad, Tensor out, Tensor y, Tensor mean, Tensor var, "
                             "Tensor? gamma, float eps, bool relu, str backend) "
                             "-> (Tensor dy, Tensor gz, Tensor dgamma, Tensor dbeta)",
    "bn_update_running_stats_": "bn_update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, "
                                "Tensor(c!)? num_batches_tracked, Tensor mean, Tensor var, int count, "
                                "float? momentum) -> ()",
}

_libs = []  # keep Library objects alive: dropping one unregisters its kernels
if not _C_STATUS[0]:
    _def = torch.library.Library(NAMESPACE, "DEF")
    for _schema in SCHEMAS.values():
        _def.define(_schema)
    _libs.append(_def)

_impl = torch.library.Library(NAMESPACE, "IMPL")
_libs.append(_impl)
QUALNAME = f"{NAMESPACE}::conv_bn_act"


def _conv_bn_act_kernel(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, backend):
    check_args(x, weight, scale, shift, residual, stride, padding, dilation, groups)
    return backends.run(backend, x, weight, scale, shift, residual, stride, padding, dilation, groups, relu)


for _key in ("CPU", "CUDA"):
    _impl.impl("conv_bn_act", _conv_bn_act_kernel, _key)


@torch.library.register_fake(QUALNAME)
def _conv_bn_act_fake(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, backend):
    shape, fmt = check_args(x, weight, scale, shift, residual, stride, padding, dilation, groups)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


# --- autograd: y = act(conv(x, W) * scale + shift + residual) -------------------------------------
def _setup_context(ctx, inputs, output):
    x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, backend = inputs
    ctx.geometry = (list(stride), list(padding), list(dilation), groups)
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.res_dtype = None if residual is None else residual.dtype
    ctx.save_for_backward(x, weight, scale, output if relu else None)


def _backward(ctx, grad):
    x, weight, scale, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    need = ctx.needs_input_grad
    g = grad.float() if grad.dtype != scale.dtype else grad
    if ctx.relu:  # torch.relu's backward (threshold_backward): zero where out <= 0, so a NaN output passes grad
        g = g.masked_fill(out <= 0, 0.0)
    d_shift = g.sum((0, 2, 3)) if need[3] else None
    d_scale = None
    if need[2]:  # the pre-BN convolution output is recomputed rather than kept alive
        conv = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        d_scale = (g * conv.to(g.dtype)).sum((0, 2, 3))
    d_res = g.to(ctx.res_dtype) if ctx.has_residual and need[4] else None
    dx = dw = None
    if need[0] or need[1]:
        g_conv = (g * scale.view(1, -1, 1, 1)).to(x.dtype)
        dx, dw, _ = torch.ops.aten.convolution_backward(
            g_conv, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need[0], need[1], False])
    return dx, dw, d_scale, d_shift, d_res, None, None, None, None, None, None


torch.library.register_autograd(QUALNAME, _backward, setup_context=_setup_context)


# --- autocast: x, weight, residual take the autocast dtype; scale, shift stay fp32 ----------------
def _register_autocast(device_type, name):
    """Both ops put x, weight at positions 0, 1 and residual at 4; positions 2, 3 (scale/shift or
    gamma/beta) keep their fp32 dtype."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))
    op = getattr(torch.ops.resnet_kernels, name).default

    def _cast(t, dt):
        return t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

    def _cast_res(r, dt):  # an fp32 residual stays fp32: added in fp32 like torchvision's shortcut
        return r if r is None or r.dtype == torch.float32 else _cast(r, dt)

    def kernel(_keyset, x, weight, scale, shift, residual, *rest):
        dt = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op(_cast(x, dt), _cast(weight, dt), scale, shift, _cast_res(residual, dt), *rest)

    _impl.impl(name, kernel, key_name, with_keyset=True)




# --- training ops ------------------------------------------------------------------------------------
TRAIN_QUALNAME = f"{NAMESPACE}::conv_bn_train"
TRAIN_BWD_QUALNAME = f"{NAMESPACE}::bn_act_train_backward"
UPDATE_QUALNAME = f"{NAMESPACE}::bn_update_running_stats_"


def _check_train(x, weight, gamma, beta, residual, stride, padding, dilation, groups):
    shape, fmt = check_args(x, weight, _k_vec(weight, x), _k_vec(weight, x), residual, stride, padding, dilation,
                            groups)
    k = shape[1]
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t is not None:
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != k:
                raise ValueError(f"{name} must be None or a 1-D tensor of the K={k} output channels, got {t!r:.80}")
            if t.device != x.device:
                raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if shape[0] * shape[2] * shape[3] == 1:
        # nn.BatchNorm2d's own rule and message (F.batch_norm's _verify_batch_size; an empty batch passes)
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(shape)}")
    return shape, fmt


def _k_vec(weight, x):
    """A stand-in [K] fp32 vector so check_args validates everything but scale/shift."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty(weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() >= 1 else 0,
                       dtype=dt, device=x.device if isinstance(x, torch.Tensor) else "cpu")


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_eps(eps):
    if eps <= 0.0:  # F.batch_norm's own rule and message (after the batch-size rule, as there)
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")


def _conv_bn_train_kernel(x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps, relu, backend):
    shape, fmt = _check_train(x, weight, gamma, beta, residual, stride, padding, dilation, groups)
    _check_eps(eps)
    if shape[0] * shape[2] * shape[3] == 0:
        # An empty batch: nn.BatchNorm2d returns an empty output; there are no statistics (NaN), and
        # fused_conv_bn_train leaves the running statistics as they are (num_batches_tracked still counts).
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        stat = torch.full((shape[1],), float("nan"), dtype=_stat_dtype(x), device=x.device)
        return out, torch.empty_like(out), stat, stat.clone()
    return backends.run_train(backend, x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps,
                              relu)


def _bn_act_train_backward_kernel(grad, out, y, mean, var, gamma, eps, relu, backend):
    if y.numel() == 0:  # an empty batch: nothing flows back, the parameters' gradients are zero
        from ._geometry import out_memory_format
        fmt = out_memory_format(y)
        dy = torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=fmt)
        gz = torch.empty(y.shape, dtype=grad.dtype, device=y.device, memory_format=fmt) if relu else grad.new_empty(0)
        return dy, gz, torch.zeros_like(mean), torch.zeros_like(mean)
    return backends.run_train_backward(backend, grad, out, y, mean, var, gamma, eps, relu)


def _bn_update_kernel(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    from . import reference
    reference.bn_update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)


for _key in ("CPU", "CUDA"):
    _impl.impl("conv_bn_train", _conv_bn_train_kernel, _key)
    _impl.impl("bn_act_train_backward", _bn_act_train_backward_kernel, _key)
    _impl.impl("bn_update_running_stats_", _bn_update_kernel, _key)


@torch.library.register_fake(TRAIN_QUALNAME)
def _conv_bn_train_fake(x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps, relu, backend):
    shape, fmt = _check_train(x, weight, gamma, beta, residual, stride, padding, dilation, groups)
    _check_eps(eps)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    stat = lambda: torch.empty(shape[1], dtype=_stat_dtype(x), device=x.device)  # noqa: E731
    return out, y, stat(), stat()


@torch.library.register_fake(TRAIN_BWD_QUALNAME)
def _bn_act_train_backward_fake(grad, out, y, mean, var, gamma, eps, relu, backend):
    from ._geometry import out_memory_format
    fmt = out_memory_format(y)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=fmt)
    gz = torch.empty(y.shape, dtype=grad.dtype, device=y.device, memory_format=fmt) if relu else grad.new_empty(0)
    return dy, gz, torch.empty_like(mean), torch.empty_like(mean)


@torch.library.register_fake(UPDATE_QUALNAME)
def _bn_update_fake(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    return None


def _train_setup_context(ctx, inputs, output):
    x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps, relu, backend = inputs
    out, y, mean, var = output
    ctx.geometry = (list(stride), list(padding), list(dilation), groups)
    ctx.eps, ctx.relu, ctx.backend = eps, relu, backend
    ctx.has_gamma, ctx.has_residual = gamma is not None, residual is not None
    ctx.res_dtype = None if residual is None else residual.dtype
    ctx.mark_non_differentiable(y, mean, var)
    ctx.save_for_backward(x, weight, gamma, out if relu else None, y, mean, var)


def _train_backward(ctx, grad, _gy, _gmean, _gvar):
    x, weight, gamma, out, y, mean, var = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    need = ctx.needs_input_grad
    if out is None:
        out = y  # unused without ReLU; the op's schema needs a tensor
    dy, gz, dgamma, dbeta = _TRAIN_BWD(grad, out, y, mean, var, gamma, ctx.eps, ctx.relu, ctx.backend)
    d_res = None
    if ctx.has_residual and need[4]:
        d_res = gz if ctx.relu else grad  # without ReLU the residual's gradient is grad itself: no copy
        if d_res.dtype != ctx.res_dtype:
            d_res = d_res.to(ctx.res_dtype)
    dx = dw = None
    if need[0] or need[1]:
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dy, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need[0], need[1], False])
    dgamma = dgamma.to(gamma.dtype) if ctx.has_gamma and need[2] else None
    dbeta = dbeta if need[3] else None
    return dx, dw, dgamma, dbeta, d_res, None, None, None, None, None, None, None


torch.library.register_autograd(TRAIN_QUALNAME, _train_backward, setup_context=_train_setup_context)


def conv_bn_train(x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps, relu, backend):
    """(out, y, mean, var); backend already resolved."""
    return _TRAIN(x, weight, gamma, beta, residual, list(stride), list(padding), list(dilation), int(groups),
                  float(eps), bool(relu), backend)


def bn_update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    _UPDATE(running_mean, running_var, num_batches_tracked, mean, var, int(count),
            None if momentum is None else float(momentum))


def conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, backend):
    """Call the op (backend already resolved to a concrete name)."""
    return _OP(x, weight, scale, shift, residual, list(stride), list(padding), list(dilation), int(groups),
               bool(relu), backend)


_OP = torch.ops.resnet_kernels.conv_bn_act.default
_TRAIN = torch.ops.resnet_kernels.conv_bn_train.default
_TRAIN_BWD = torch.ops.resnet_kernels.bn_act_train_backward.default
_UPDATE = torch.ops.resnet_kernels.bn_update_running_stats_.default


def build_info():
    return torch.ops.resnet_kernels.build_info() if _C_STATUS[0] else "extension not loaded"


for _dev in ("cpu", "cuda"):
    for _name in ("conv_bn_act", "conv_bn_train"):
        _register_autocast(_dev, _name)
