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
SCHEMAS = {
    "conv_bn_act": "conv_bn_act(Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor? residual, "
                   "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, str backend) -> Tensor",
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
    ctx.save_for_backward(x, weight, scale, output if relu else None)


def _backward(ctx, grad):
    x, weight, scale, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    need = ctx.needs_input_grad
    g = grad.float() if grad.dtype != scale.dtype else grad
    if ctx.relu:
        g = g * (out > 0)
    d_shift = g.sum((0, 2, 3)) if need[3] else None
    d_scale = None
    if need[2]:  # the pre-BN convolution output is recomputed rather than kept alive
        conv = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        d_scale = (g * conv.to(g.dtype)).sum((0, 2, 3))
    d_res = g.to(grad.dtype) if ctx.has_residual and need[4] else None
    dx = dw = None
    if need[0] or need[1]:
        g_conv = (g * scale.view(1, -1, 1, 1)).to(x.dtype)
        dx, dw, _ = torch.ops.aten.convolution_backward(
            g_conv, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need[0], need[1], False])
    return dx, dw, d_scale, d_shift, d_res, None, None, None, None, None, None


torch.library.register_autograd(QUALNAME, _backward, setup_context=_setup_context)


# --- autocast: x, weight, residual take the autocast dtype; scale, shift stay fp32 ----------------
def _register_autocast(device_type):
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))
    op = torch.ops.resnet_kernels.conv_bn_act.default

    def _cast(t, dt):
        return t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

    def kernel(_keyset, x, weight, scale, shift, residual, *rest):
        dt = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op(_cast(x, dt), _cast(weight, dt), scale, shift, _cast(residual, dt), *rest)

    _impl.impl("conv_bn_act", kernel, key_name, with_keyset=True)


for _dev in ("cpu", "cuda"):
    _register_autocast(_dev)


def conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu, backend):
    """Call the op (backend already resolved to a concrete name)."""
    return _OP(x, weight, scale, shift, residual, list(stride), list(padding), list(dilation), int(groups),
               bool(relu), backend)


_OP = torch.ops.resnet_kernels.conv_bn_act.default


def build_info():
    return torch.ops.resnet_kernels.build_info() if _C_STATUS[0] else "extension not loaded"
