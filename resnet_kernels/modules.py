"""Fused modules: drop-in replacements that keep the original parameter and buffer names.

- FusedConvBNAct: conv -> BN -> (ReLU), with an optional residual added before the ReLU.
  Standalone (`from_modules`) it owns `conv`, `bn`, `act` as children. Placed by `convert` in
  the conv's slot of a parent (the ResNet stem, a downsample Sequential) it owns the conv's
  `weight`/`bias` under their own names, and the BN's parameters and buffers stay at the BN's
  slot in a FoldedBatchNorm, so the parent's state_dict keys do not change.
- FusedBasicBlock / FusedBottleneck: torchvision's blocks with the BN, the residual add and the
  ReLUs in the convolutions' epilogues; same children, same state_dict.

Eval mode with running statistics uses the fused inference op. Training mode (and a BN without
running statistics) uses the fused training op: conv + batch statistics, one fused
normalise/residual/ReLU pass, nn.BatchNorm2d's exact running-stat update, and a fused backward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends, reference
from ._geometry import as_canonical, out_memory_format
from .functional import fold_bn, fused_conv_bn_act, fused_conv_bn_train

_BACKENDS = ("auto", "torch", "triton", "cuda")


class FoldedBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d whose normalisation has moved into the preceding convolution's epilogue.

    It holds the same parameters and buffers (same tensors, same names) as the BN it replaces, so
    state_dicts and optimizers see no change; its forward is the identity. `normalize(y)` is the
    original BatchNorm2d forward, which the fused convolution uses in training mode.
    """

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> "FoldedBatchNorm":
        new = cls.__new__(cls)
        # Same tensors, fresh containers: registering on one module must not change the other.
        new.__dict__.update({k: (type(v)(v) if isinstance(v, (dict, set)) else v) for k, v in bn.__dict__.items()})
        return new

    def forward(self, x):
        return x

    def normalize(self, y):
        return nn.BatchNorm2d.forward(self, y)

    def _get_name(self):
        return "FoldedBatchNorm"


def _normalize(bn, y):
    return bn.normalize(y) if isinstance(bn, FoldedBatchNorm) else bn(y)


def hooks_problem(module, what):
    """None if `module` has no module hooks, else the reason: a fused op never calls the modules it
    replaces, so their forward / pre-forward / backward hooks would silently stop running."""
    kinds = [k for k, attr in (("forward", "_forward_hooks"), ("forward pre", "_forward_pre_hooks"),
                               ("backward", "_backward_hooks"), ("backward pre", "_backward_pre_hooks"))
             if getattr(module, attr, None)]
    return f"{what} has {' and '.join(kinds)} hooks (fusing would skip them)" if kinds else None


def is_plain_relu(module):
    """An nn.ReLU itself (a subclass may compute something else) with no hooks."""
    return type(module) is nn.ReLU and hooks_problem(module, "") is None


def conv_bn_problem(conv, bn, allow_folded=False):
    """None if (conv, bn) can be fused, else the reason."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    problem = hooks_problem(conv, "the conv") or hooks_problem(bn, "the BN")
    if problem:
        return problem
    if conv.padding_mode != "zeros":
        return f"conv padding_mode={conv.padding_mode!r} (only zero padding is fused)"
    if isinstance(conv.padding, str):
        return f"conv padding={conv.padding!r} (string padding modes are not fused)"
    if isinstance(bn, FoldedBatchNorm) and not allow_folded:
        return "BN already folded"
    if type(bn) is not nn.BatchNorm2d and not isinstance(bn, FoldedBatchNorm):
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            return f"unknown BatchNorm subclass {type(bn).__module__}.{type(bn).__name__} is not treated as BatchNorm2d"
        return f"{type(bn).__name__} is not BatchNorm2d"
    if bn.num_features != conv.out_channels:
        return f"BN has {bn.num_features} features but the conv has {conv.out_channels} output channels"
    if bn.running_mean is None or bn.running_var is None:
        return "BN has no running statistics (track_running_stats=False): it normalises with batch statistics"
    return None


def _sig(t):
    return None if t is None else (id(t), t._version, t.data_ptr(), t.dtype, t.device)


def _bn_constants(bn, conv_bias):
    """(scale, shift) of an eval-mode BN, cached on the BN module while its sources are unchanged.

    The key holds identity, version counter and storage of every source. BN's running-stat
    update in training mode does not bump the statistics' version counters, but it always bumps
    `num_batches_tracked`'s (the update happens only together with `num_batches_tracked.add_(1)`),
    which is part of the key. No cache while autograd records, under torch.compile, for BNs
    without `num_batches_tracked`, or for inference tensors; `clear_caches()` empties it.
    """
    tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var, conv_bias)
    if (torch.compiler.is_compiling() or bn.num_batches_tracked is None
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
            or any(t is not None and t.is_inference() for t in tensors + (bn.num_batches_tracked,))):
        return fold_bn(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, conv_bias)
    key = (reference.cache_generation(), bn.eps, _sig(bn.num_batches_tracked)) + tuple(_sig(t) for t in tensors)
    hit = bn.__dict__.get("_resnet_kernels_fold")
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():  # normal tensors: later calls may save them for backward
        value = fold_bn(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, conv_bias)
    # The entry holds its sources, so no freed tensor's id or storage can be reused to fake a hit.
    bn.__dict__["_resnet_kernels_fold"] = (key, value, tensors + (bn.num_batches_tracked,))
    return value


def _all_finite(bn, scale):
    """Whether every BN scale is finite; remembered per scale tensor (the cached constants are the
    same object while the BN is unchanged), so the check costs one reduction per fill, not per call."""
    hit = bn.__dict__.get("_resnet_kernels_finite")
    if hit is not None and hit[0] is scale:
        return hit[1]
    ok = bool(torch.isfinite(scale).all())
    bn.__dict__["_resnet_kernels_finite"] = (scale, ok)
    return ok


def _check_backend(backend):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return backend


def _batch_stats(bn):
    """nn.BatchNorm2d's rule: batch statistics in training, and in eval when it has no running stats."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _train_problem(x, conv_bias, bn):
    """None when the fused training op reproduces this BN exactly, else why not."""
    if conv_bias is not None:
        return "the conv has a bias"
    if (bn.running_mean is None) != (bn.running_var is None):
        return "only one of running_mean / running_var is set"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return "x is not a 4-D tensor"
    return None


def _conv_bn(x, weight, conv_bias, conv, bn, residual, relu, backend):
    """relu?(bn(conv(x)) + residual): fused in eval mode with running stats; in training mode
    (batch statistics) the fused training op with nn.BatchNorm2d's exact running-stat update."""
    if _batch_stats(bn) and _train_problem(x, conv_bias, bn) is None:
        update = bn.training and bn.track_running_stats and bn.running_mean is not None
        return fused_conv_bn_train(
            x, weight, bn.weight, bn.bias, residual, running_mean=bn.running_mean if update else None,
            running_var=bn.running_var if update else None,
            num_batches_tracked=bn.num_batches_tracked if update else None, momentum=bn.momentum, eps=bn.eps,
            update_running_stats=update, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            groups=conv.groups, relu=relu, backend=backend)
    if bn.training or bn.running_mean is None or bn.running_var is None:
        y = _normalize(bn, F.conv2d(x, weight, conv_bias, conv.stride, conv.padding, conv.dilation, conv.groups))
        if residual is not None:
            y = y + residual
        return F.relu(y) if relu else y
    scale, shift = _bn_constants(bn, conv_bias)
    if conv_bias is not None and not torch.compiler.is_compiling() and not _all_finite(bn, scale):
        # var + eps == 0 (eps=0): scale is +-inf, and folding the conv bias into shift would change
        # which elements become NaN (inf - inf) and which +-inf. Run the unfused ops so every
        # non-finite value lands where BatchNorm puts it. (Under torch.compile the folded form is traced.)
        backends.resolve(backend, x, weight, conv.groups)  # a named backend that cannot serve still refuses
        y = _normalize(bn, F.conv2d(x, weight, conv_bias, conv.stride, conv.padding, conv.dilation, conv.groups))
        if residual is not None:
            y = y + residual
        y = F.relu(y) if relu else y
        return as_canonical(y if y.dtype == x.dtype else y.to(x.dtype), out_memory_format(x))  # the op's contract
    if x.dtype == torch.float64:
        scale, shift = scale.double(), shift.double()
    return fused_conv_bn_act(x, weight, scale, shift, residual, stride=conv.stride, padding=conv.padding,
                             dilation=conv.dilation, groups=conv.groups, relu=relu, backend=backend)


class FusedConvBNAct(nn.Module):
    """act(BN(conv(x)) [+ residual]) as one fused op in eval mode.

    Input/output: [N, C, H, W] in either memory format; the output follows the input's.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module | None = None, *,
                 backend: str = "auto", _in_slot: bool = False):
        super().__init__()
        problem = conv_bn_problem(conv, bn, allow_folded=_in_slot)
        if problem:
            raise ValueError(f"cannot fuse conv and bn: {problem}")
        if act is not None and type(act) not in (nn.ReLU, nn.Identity):
            raise ValueError(f"act must be None, nn.ReLU or nn.Identity (not a subclass: it may compute "
                             f"something else), got {type(act).__name__}")
        self.backend = _check_backend(backend)
        self.relu = isinstance(act, nn.ReLU)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self._in_slot = _in_slot
        if _in_slot:
            # Lives in the conv's slot: the conv's parameters keep their names (weight, bias); the BN
            # lives at its own slot as a FoldedBatchNorm and is referenced, not registered, here.
            self.weight = conv.weight
            self.register_parameter("bias", conv.bias)
            self.__dict__["bn"] = bn
        else:
            self.conv, self.bn = conv, bn
            self.act = act if act is not None else nn.Identity()

    @classmethod
    def from_modules(cls, conv, bn, act=None, *, backend="auto"):
        return cls(conv, bn, act, backend=backend)

    def _conv_params(self):
        return (self.weight, self.bias) if self._in_slot else (self.conv.weight, self.conv.bias)

    def forward(self, x, residual=None):
        weight, bias = self._conv_params()
        return _conv_bn(x, weight, bias, self, self.bn, residual, self.relu, self.backend)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bn=folded, relu={self.relu}, backend={self.backend!r}"


class _FusedBlock(nn.Module):
    """Shared machinery: the original children under their names."""

    _pairs: tuple = ()
    _source_type = None

    def __init__(self, block: nn.Module, backend: str = "auto"):
        super().__init__()
        self.backend = _check_backend(backend)
        for name, child in block.named_children():
            self.add_module(name, child)
        if "downsample" not in self._modules:
            self.downsample = None
        for name in ("stride", "dilation", "groups", "base_width"):
            if hasattr(block, name):
                setattr(self, name, getattr(block, name))

    @classmethod
    def from_block(cls, block, *, backend="auto"):
        problem = cls.block_problem(block)
        if problem:
            raise ValueError(f"cannot fuse {type(block).__name__}: {problem}")
        return cls(block, backend)

    @classmethod
    def block_problem(cls, block):
        src = cls._source_type()
        if not isinstance(block, src):
            return f"expected a torchvision {src.__name__}, got {type(block).__name__}"
        if type(block).forward is not src.forward:
            return f"{type(block).__name__} overrides forward"
        for c, b in cls._pairs:
            problem = conv_bn_problem(getattr(block, c), getattr(block, b))
            if problem:
                return f"{c}/{b}: {problem}"
        if type(block.relu) is not nn.ReLU:
            return f"relu is {type(block.relu).__name__}, not a plain nn.ReLU"
        return hooks_problem(block, "the block") or hooks_problem(block.relu, "its relu")

    def _cbr(self, x, conv_name, bn_name, residual=None, relu=True):
        conv = getattr(self, conv_name)
        return _conv_bn(x, conv.weight, conv.bias, conv, getattr(self, bn_name), residual, relu, self.backend)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        last = len(self._pairs) - 1
        for i, (c, b) in enumerate(self._pairs):
            out = self._cbr(out, c, b, residual=identity if i == last else None, relu=True)
        return out

    def extra_repr(self):
        steps = [f"{c}+{b}+relu" for c, b in self._pairs[:-1]]
        c, b = self._pairs[-1]
        return f"backend={self.backend!r}, fused=[{', '.join(steps)}, {c}+{b}+add+relu]"


def _tv_basic():
    from torchvision.models.resnet import BasicBlock
    return BasicBlock


def _tv_bottleneck():
    from torchvision.models.resnet import Bottleneck
    return Bottleneck


class FusedBasicBlock(_FusedBlock):
    """torchvision BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)) in two fused ops
    (three with a downsample shortcut, which `convert` fuses as conv+BN)."""

    _pairs = (("conv1", "bn1"), ("conv2", "bn2"))
    _source_type = staticmethod(_tv_basic)


class FusedBottleneck(_FusedBlock):
    """torchvision Bottleneck (incl. ResNeXt groups and wide variants) in three fused ops."""

    _pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    _source_type = staticmethod(_tv_bottleneck)
