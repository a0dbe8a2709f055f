"""convert(model): swap torchvision residual blocks and conv->BN(->ReLU) chains for fused modules.

The walk visits the tree once, post-order. torchvision BasicBlock/Bottleneck become
FusedBasicBlock/FusedBottleneck (same children, same state_dict). Inside every other module,
a one-level torch.fx trace (children kept as leaves) finds conv -> BN (-> ReLU) chains where each
output has exactly one user and each module is called once and registered once in the model:
the stem (conv1, bn1, relu) and downsample Sequentials are such chains. A chain is replaced in
place: FusedConvBNAct in the conv's slot, FoldedBatchNorm (same tensors) in the BN's slot,
nn.Identity in the ReLU's slot, so no parameter or buffer changes name.

Anything else is left alone and reported by `summary`, with the reason.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn

from . import reference
from .modules import (FoldedBatchNorm, FusedBasicBlock, FusedBottleneck, FusedConvBNAct, _check_backend,
                      conv_bn_problem, is_plain_relu)

_REPORT_ATTR = "_resnet_kernels_skipped"
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _block_types():
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # torchvision is optional: only generic chains are fused then
        return {}
    return {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}


def _is_norm(m):
    if isinstance(m, _NORMS):
        return True
    return type(m).__name__ in ("FrozenBatchNorm2d",) or "Norm" in type(m).__name__


class _OneLevelTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return True


class _Converter:
    def __init__(self, root, backend, filter_fn):
        self.backend = backend
        self.filter = filter_fn
        self.skipped = []
        # A module registered under two names (shared) is never folded: the other use would see it changed.
        self.registrations = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))

    def skip(self, name, reason, warn=False):
        self.skipped.append((name or "<root>", f"skipped: {reason}"))
        if warn:
            warnings.warn(f"resnet_kernels.convert: {name or '<root>'} skipped: {reason}", stacklevel=4)

    def allowed(self, module, name):
        return self.filter is None or self.filter(module, name)

    def visit(self, module, name):
        """Convert module's subtree; return the module that should take its place."""
        if isinstance(module, (FusedConvBNAct, FusedBasicBlock, FusedBottleneck, FoldedBatchNorm)):
            return module
        fused_cls = _block_types().get(type(module)) or next(
            (f for t, f in _block_types().items() if isinstance(module, t)), None)
        if fused_cls is not None and self.allowed(module, name):
            ds = getattr(module, "downsample", None)
            if ds is not None:
                new_ds = self.visit(ds, f"{name}.downsample")
                if new_ds is not ds:
                    module.downsample = new_ds
            problem = fused_cls.block_problem(module)
            if self.registrations[id(module)] > 1:
                problem = "the block is registered more than once in the model"
            if problem is None:
                return fused_cls(module, self.backend)
            self.skip(name, problem, warn="subclass" in problem)
        for child_name, child in list(module.named_children()):
            qual = f"{name}.{child_name}" if name else child_name
            new = self.visit(child, qual)
            if new is not child:
                setattr(module, child_name, new)
        if self.allowed(module, name):
            self.fuse_chains(module, name)
        return module

    def fuse_chains(self, module, name):
        children = dict(module.named_children())
        convs = [n for n, c in children.items() if type(c) is nn.Conv2d]
        norms = [n for n, c in children.items() if _is_norm(c) and not isinstance(c, FoldedBatchNorm)]
        if not convs or not norms:
            return
        try:
            graph = _OneLevelTracer().trace(module)
        except Exception as e:  # noqa: BLE001 - any tracing failure means "not analysable"
            for n in norms:
                self.skip(_q(name, n), f"the parent {type(module).__name__} could not be traced by torch.fx "
                          f"({type(e).__name__})")
            return
        calls = Counter(node.target for node in graph.nodes if node.op == "call_module")

        def sole_module_user(node):
            users = list(node.users)
            if len(users) != 1 or users[0].op != "call_module" or users[0].args != (node,) or users[0].kwargs:
                return None
            return users[0]

        folded = set()
        for node in graph.nodes:
            if node.op != "call_module" or node.target not in convs:
                continue
            nxt = sole_module_user(node)
            if nxt is None or nxt.target not in norms:
                continue
            conv, bn = children[node.target], children[nxt.target]
            bn_name = _q(name, nxt.target)
            problem = conv_bn_problem(conv, bn)
            if problem is None and (calls[node.target] > 1 or calls[nxt.target] > 1):
                problem = "the conv or BN is called more than once in its parent's forward"
            if problem is None and (self.registrations[id(conv)] > 1 or self.registrations[id(bn)] > 1):
                problem = "the conv or BN is registered more than once in the model (shared module)"
            if problem is not None:
                self.skip(bn_name, problem, warn="subclass" in problem)
                folded.add(nxt.target)
                continue
            act_node = sole_module_user(nxt)
            relu = None
            if (act_node is not None and is_plain_relu(children.get(act_node.target))
                    and calls[act_node.target] == 1 and self.registrations[id(children[act_node.target])] == 1):
                relu = children[act_node.target]
            fbn = FoldedBatchNorm.from_bn(bn)
            setattr(module, node.target, FusedConvBNAct(conv, fbn, relu, backend=self.backend, _in_slot=True))
            setattr(module, nxt.target, fbn)
            if relu is not None:
                setattr(module, act_node.target, nn.Identity())
            folded.add(nxt.target)
        for n in norms:
            if n not in folded:
                self.skip(_q(name, n), f"{type(children[n]).__name__} does not directly follow a plain "
                          "nn.Conv2d as that conv's only user")


def _q(parent, child):
    return f"{parent}.{child}" if parent else child


def convert(model: nn.Module, *, backend: str = "auto", inplace: bool = False, channels_last: bool = True,
            filter=None) -> nn.Module:
    """Return `model` with residual blocks and conv->BN(->ReLU) chains fused.

    backend: "auto" (default), "torch", "triton" or "cuda", used by every fused module.
    inplace: modify `model` itself instead of a deep copy.
    channels_last: when the root is not itself a fused block, 4-D float inputs to the root are
        moved to channels_last (the kernels' native layout) by a forward pre-hook; every fused op's
        output follows its input's memory format. The same hook checks the input for NaN/Inf once
        per forward, so the fused ops inside need not (reference.begin_finite_scope).
    filter: optional callable (module, qualified_name) -> bool; False leaves that subtree's own
        fusions out.
    The original state_dict loads strictly into the result and back; converting twice changes nothing.
    """
    _check_backend(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter is not None and not callable(filter):
        raise TypeError("filter must be None or a callable (module, qualified_name) -> bool, got "
                        f"{type(filter).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    conv = _Converter(model, backend, filter)
    out = conv.visit(model, "")
    previous = dict(getattr(model, _REPORT_ATTR, []))
    previous.update(dict(conv.skipped))
    out.__dict__[_REPORT_ATTR] = sorted(previous.items())
    if channels_last and not isinstance(out, (FusedBasicBlock, FusedBottleneck, FusedConvBNAct)) \
            and not getattr(out, "_resnet_kernels_cl_hook", False) and any(
                isinstance(m, (FusedBasicBlock, FusedBottleneck, FusedConvBNAct)) for m in out.modules()):
        out.register_forward_pre_hook(_to_channels_last)
        out.register_forward_hook(_end_finite_scope, always_call=True)
        out.__dict__["_resnet_kernels_cl_hook"] = True
    return out


def _to_channels_last(module, args):
    new = None
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 and args[0].is_floating_point():
        new = (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
    if not torch.compiler.is_compiling():
        # The input's NaN/Inf check, once per forward (reference.py: finite scope); the fused ops
        # inside then check only tensors that no fused op of this forward produced.
        reference.begin_finite_scope((new or args or (None,))[0])
    return new


def _end_finite_scope(module, args, output):
    if not torch.compiler.is_compiling():
        reference.end_finite_scope()


def summary(model: nn.Module):
    """[(qualified name, fused kind or "skipped: reason")] for every fused module and every
    candidate (norm layer or residual block) that was not fused."""
    rows = []
    seen_fused = set()
    for name, m in model.named_modules():
        if isinstance(m, (FusedBasicBlock, FusedBottleneck)):
            rows.append((name or "<root>", f"{type(m).__name__}({m.extra_repr()})"))
        elif isinstance(m, FusedConvBNAct):
            rows.append((name or "<root>", "conv+bn+relu" if m.relu else "conv+bn"))
        else:
            continue
        seen_fused.add(name)
    skipped = dict(getattr(model, _REPORT_ATTR, []))
    if not hasattr(model, _REPORT_ATTR):
        blocks = tuple(_block_types())
        for name, m in model.named_modules():
            if (_is_norm(m) and not isinstance(m, FoldedBatchNorm)) or (blocks and isinstance(m, blocks)):
                skipped[name or "<root>"] = "skipped: not converted (call resnet_kernels.convert)"
    rows += sorted(skipped.items())
    return rows
