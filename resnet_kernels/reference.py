"""The `torch` backend: conv_bn_act as a composite of ATen ops.

This is the CPU default and the portable path everywhere. fp32/fp64 fold the BN scale into the
convolution's weight (exact to a rounding) and pass the shift as the convolution's bias; on CPU
with channels_last input the folded weight is also prepacked into oneDNN's blocked layout once,
and ReLU and the residual add run as oneDNN post-ops of the convolution
(`mkldnn::_convolution_pointwise`): the output is written once, the weight never re-laid out.
Measured on the 2-core CI machine (ResNet-50, batch 8, 224x224, one process, interleaved runs):
per-call folding 494 ms, cached fold + ATen conv + in-place add/ReLU 454 ms, cached prepacked
weight + oneDNN post-ops 409 ms, eager channels_last 498 ms.

NaN/Inf: oneDNN's ReLU post-op maps NaN to 0 (torch.relu keeps it) and its sum post-op can saturate
+inf to 3.4e38, so the post-op path is taken only where no NaN/Inf can meet them: a folded weight
with a NaN/Inf never gets it (checked once, when the plan is cached per weight version), and x,
shift and residual are checked by one sum each (`_postops_exact`; inside a converted model's
forward only tensors no fused op made from checked inputs: "finite scope" below); otherwise ATen's
convolution + in-place add_/relu_ run, which propagate NaN/Inf like eager PyTorch. Overflow inside
the convolution from finite inputs is not detected (see README, Numerics).

fp16/bf16 keep BN as an fp32 epilogue: folding a scale spread over 1e-4..1e3 into low-precision
weights loses accuracy or overflows.

Folded weights are cached per weight tensor. An entry is used only while the weight is the same
object with the same version counter and storage, and the BN scale has the same values (compared
on every call: BN's own running-stat update in training mode does not bump version counters). No
cache is used while autograd records (training, fine-tuning) or for float64 (the oracle and
gradcheck dtype). Writes through `.data` bypass version counters: after such a write to an fp32
weight used for inference, call resnet_kernels.clear_caches().
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import weakref

import torch
import torch.nn.functional as F

from ._geometry import as_canonical, out_memory_format

_FOLD_DTYPES = (torch.float32, torch.float64)
_tls = threading.local()
_MAX_ENTRIES_PER_WEIGHT = 4  # prepacked variants per weight (input shapes differ in batch/size)


class _FoldCache:
    def __init__(self):
        self._entries = {}
        self._lock = threading.Lock()

    def clear(self):
        with self._lock:
            self._entries.clear()

    def __len__(self):
        return len(self._entries)

    def lookup(self, weight, scale, kind):
        """The cached value for (weight, scale, kind), or a miss token to store one with `put`."""
        if getattr(_tls, "off", False) or weight.dtype != torch.float32:
            return None, None  # autograd records this call, or fp64 (the oracle and gradcheck dtype)
        try:
            version = weight._version
        except RuntimeError:  # inference tensors keep no version counter: never cache them
            return None, None
        sig = (version, weight.data_ptr(), weight.dtype, weight.device, tuple(weight.shape))
        key = id(weight)
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and entry["ref"]() is weight and entry["sig"] == sig \
                and entry["scale"].shape == scale.shape and torch.equal(entry["scale"], scale):
            if kind in entry["values"]:
                return entry["values"][kind], None
        else:
            entry = None
        return None, (key, weight, scale, sig, entry, kind)

    def put(self, miss, value):
        if miss is None:
            return
        key, weight, scale, sig, entry, kind = miss
        with self._lock:
            if entry is None:
                ref = weakref.ref(weight, lambda _r, k=key, d=self._entries: d.pop(k, None))
                entry = {"ref": ref, "sig": sig, "scale": scale.detach().clone(), "values": {}}
                self._entries[key] = entry
            if len(entry["values"]) >= _MAX_ENTRIES_PER_WEIGHT:
                entry["values"].clear()
            entry["values"][kind] = value


_cache = _FoldCache()


@contextlib.contextmanager
def caching_disabled():
    """Calls inside do not read or fill the weight cache (used while autograd records: the op's
    forward then runs with grad mode off, so the kernel itself cannot tell)."""
    prev = getattr(_tls, "off", False)
    _tls.off = True
    try:
        yield
    finally:
        _tls.off = prev


_generation = [0]


def cache_generation():
    """Bumped by clear_caches(); part of every cache key in the package."""
    return _generation[0]


def clear_caches():
    """Drop every folded/prepacked weight and cached BN constant (needed only after writing a
    weight or BN tensor through `.data`, which bypasses version counters)."""
    _generation[0] += 1
    _cache.clear()


def _fold(weight, scale):
    """weight * scale per output channel, or None where that overflows (then BN stays an epilogue)."""
    with torch.no_grad():
        folded = weight * scale.to(weight.dtype).view(-1, 1, 1, 1)
        if not bool(torch.isfinite(folded).all()) and bool(torch.isfinite(weight).all()):
            return None
    return folded


def _folded(weight, scale, memory_format):
    value, miss = _cache.lookup(weight, scale, ("fold", memory_format))
    if value is None:
        value = _fold(weight, scale)
        value = False if value is None else value.contiguous(memory_format=memory_format)
        _cache.put(miss, value)
    return None if value is False else value


def _onednn_ok(x, weight):
    return (x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and x.numel() > 0
            and out_memory_format(x) == torch.channels_last)


def _aten_path(x, folded, shift, residual, stride, padding, dilation, groups, relu, fmt):
    y = as_canonical(F.conv2d(x, folded, shift.to(x.dtype), stride, padding, dilation, groups), fmt)
    if residual is not None:
        y.add_(residual)
    if relu:
        y.relu_()
    return y


# --- NaN/Inf and oneDNN's post-ops ----------------------------------------------------------------
# A converted model's forward opens a "finite scope" (convert.py's hooks): its input is checked once,
# and every output the oneDNN path makes from checked inputs inside the scope is recorded, so the
# next fused op that reads it (x or residual) needs no check of its own. Anything else (the output of
# a non-fused layer such as max-pooling, a direct functional call) is checked per call.
def begin_finite_scope(x):
    """Open a scope for one forward; `x` (the model input) is recorded as finite if it is."""
    stack = getattr(_tls, "finite", None)
    if stack is None:
        stack = _tls.finite = []
    known = {}
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu" \
            and bool(torch.isfinite(x.sum())):
        known[id(x)] = (weakref.ref(x), _version_or_none(x))
    stack.append(known)


def end_finite_scope():
    stack = getattr(_tls, "finite", None)
    if stack:
        stack.pop()


def _version_or_none(t):
    if t.is_inference():  # torch.inference_mode's tensors keep no version counter (asking raises,
        return None       # and a raised error costs ~0.1 ms)
    return t._version


def _known_finite(t):
    """True for a tensor recorded in this thread's innermost scope and not written in place since
    (as far as its version counter tells: inference tensors have none)."""
    stack = getattr(_tls, "finite", None)
    if not stack:
        return False
    entry = stack[-1].get(id(t))
    return entry is not None and entry[0]() is t and entry[1] == _version_or_none(t)


def _record_finite(y):
    stack = getattr(_tls, "finite", None)
    if stack:
        stack[-1][id(y)] = (weakref.ref(y), _version_or_none(y))


def _postops_exact(x, shift, residual, relu):
    """Whether oneDNN's post-ops give the eager result for this call. Its ReLU post-op maps NaN to 0
    (torch.relu keeps NaN) and its sum post-op can saturate +inf to 3.4e38, so a NaN/Inf in x, the
    shift or the residual must take the ATen path (conv + in-place add_/relu_, NaN/Inf exact). One
    fp32 sum over each tensor not already known finite decides: it is non-finite when any element is
    (NaN, or inf + -inf = NaN), and also when finite values overflow the sum, which only costs the
    slower exact path."""
    if not relu and residual is None:
        return True  # no post-op: the convolution with its bias propagates NaN/Inf itself
    total = shift.sum()
    check = [t for t in (x, residual) if t is not None and not _known_finite(t)]
    for t in check:
        total = total + t.sum()
    if not bool(torch.isfinite(total)):
        return False
    for t in check:  # x is often read by two convolutions (a block's first conv and its downsample)
        _record_finite(t)
    return True


def _record_if_inputs_finite(y, x, shift, residual):
    """After the ATen path with a finite weight: record y when its inputs are known finite."""
    if getattr(_tls, "finite", None) and _known_finite(x) and (residual is None or _known_finite(residual)) \
            and bool(torch.isfinite(shift.sum())):
        _record_finite(y)


def _onednn_path(x, packed, shift, residual, stride, padding, dilation, groups, relu, fmt):
    if residual is not None:
        res = residual.contiguous(memory_format=fmt)  # the post-op reads it in the output's layout
        y = torch.ops.mkldnn._convolution_pointwise.binary(
            x, res, packed, shift, padding, stride, dilation, groups, "add", 1.0, "relu" if relu else None, [], None)
    else:
        y = torch.ops.mkldnn._convolution_pointwise(
            x, packed, shift, padding, stride, dilation, groups, "relu" if relu else "none", [], "")
    return as_canonical(y, fmt)


def _faster(a, b, reps=2):
    """The faster of two thunks, each timed `reps` times interleaved (min of each)."""
    ta, tb = float("inf"), float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        t2 = time.perf_counter()
        ta, tb = min(ta, t1 - t0), min(tb, t2 - t1)
    return "onednn" if ta <= tb else "aten"


_plans = {}  # geometry -> "onednn" | "aten", measured once per process


def _cpu_plan(weight, scale, x, stride, padding, dilation, groups, args):
    """For a cacheable CPU fp32 channels_last call: ("onednn", prepacked weight) or ("aten", folded
    weight); ("exact", folded weight) when that holds a NaN/Inf (never oneDNN's post-ops, see
    _postops_exact). oneDNN's prepacked weight with post-ops wins on the deep, small-spatial ResNet layers
    (up to 1.5x) but loses on some wide, large-spatial ones (the stem, 64->256 1x1 at 56x56), so the
    choice is measured the first time a geometry is seen and then kept for every weight of that
    geometry in the process. torch.use_deterministic_algorithms(True) always takes "aten"."""
    shift, residual, relu = args
    geometry = (tuple(weight.shape), tuple(x.shape), tuple(stride), tuple(padding), tuple(dilation), groups,
                residual is not None, relu)
    kind = ("cpu_plan",) + geometry
    value, miss = _cache.lookup(weight, scale, kind)
    if value is not None or miss is None:
        return value
    folded = _fold(weight, scale)
    if folded is None:
        _cache.put(miss, ("none", None))
        return ("none", None)
    folded = folded.contiguous(memory_format=torch.channels_last)
    if not bool(torch.isfinite(folded).all()):
        # A NaN/Inf weight (or one BN folds to non-finite): oneDNN's ReLU post-op would turn NaN
        # outputs into 0. Checked once per weight version (the cache key), never per call.
        _cache.put(miss, ("exact", folded))
        return ("exact", folded)

    def pack():
        return torch._C._nn.mkldnn_reorder_conv2d_weight(folded.contiguous().to_mkldnn(), padding, stride,
                                                        dilation, groups, list(x.shape))

    choice = "aten" if torch.are_deterministic_algorithms_enabled() else _plans.get(geometry)
    if choice is None:
        packed = pack()
        common = (shift, residual, stride, padding, dilation, groups, relu, torch.channels_last)
        choice = _faster(lambda: _onednn_path(x, packed, *common), lambda: _aten_path(x, folded, *common))
        _plans[geometry] = choice
    value = (choice, pack() if choice == "onednn" else folded)
    _cache.put(miss, value)
    return value


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
    if x.dtype in _FOLD_DTYPES:
        plan = _cpu_plan(weight, scale, x, stride, padding, dilation, groups, (shift, residual, relu)) \
            if _onednn_ok(x, weight) else None
        if plan is not None and plan[0] == "onednn" and _postops_exact(x, shift, residual, relu):
            y = _onednn_path(x, plan[1], shift, residual, stride, padding, dilation, groups, relu, fmt)
            _record_finite(y)  # finite inputs and weight (overflow inside the conv aside: README)
            return y
        if plan is not None and plan[0] == "onednn":  # a NaN/Inf in x, shift or residual
            folded = _folded(weight, scale, fmt)
            return _aten_path(x, folded, shift, residual, stride, padding, dilation, groups, relu, fmt)
        if plan is not None and plan[0] == "aten":
            y = _aten_path(x, plan[1], shift, residual, stride, padding, dilation, groups, relu, fmt)
            _record_if_inputs_finite(y, x, shift, residual)
            return y
        if plan is not None and plan[0] == "exact":  # a NaN/Inf in the folded weight
            return _aten_path(x, plan[1], shift, residual, stride, padding, dilation, groups, relu, fmt)
        folded = _folded(weight, scale, fmt) if plan is None else None
        if folded is not None:
            return _aten_path(x, folded, shift, residual, stride, padding, dilation, groups, relu, fmt)
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


# --- training: BN with batch statistics -----------------------------------------------------------
def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(t):
    return t.view(1, -1, 1, 1)


def bn_act_apply(y, mean, var, gamma, beta, residual, eps, relu, fmt):
    """act((y - mean) * rsqrt(var + eps) * gamma + beta + residual) in fp32 (fp64 for fp64), one
    rounding to y's dtype. Written as y * a + b with per-channel a, b: one pass over y."""
    a = torch.rsqrt(var + eps)
    if gamma is not None:
        a = a * gamma.to(a.dtype)
    b = -mean * a if beta is None else beta.to(a.dtype) - mean * a
    acc = torch.empty(y.shape, dtype=a.dtype, device=y.device, memory_format=fmt)
    torch.mul(y, _per_channel(a), out=acc)
    acc.add_(_per_channel(b))
    if residual is not None:
        acc.add_(residual)
    if relu:
        acc.relu_()
    return as_canonical(acc if acc.dtype == y.dtype else acc.to(y.dtype), fmt)


def conv_bn_train(x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps, relu):
    """(out, y, mean, var) of a training-mode conv -> BN(batch stats) -> (+ residual) -> act.

    ATen's own batch-norm kernel normalises (statistics and apply fused, one read of y for each;
    channels_last-aware on CPU, cuDNN-class on GPU); the residual add and ReLU run in place on its
    output. Measured on the 2-core CPU (resnet18 train step): a var_mean + fp32-epilogue composite
    was 0.75x eager, this is on par with it.
    """
    fmt = out_memory_format(x)
    w = weight if weight.is_contiguous(memory_format=fmt) else weight.contiguous(memory_format=fmt)
    y = as_canonical(F.conv2d(x, w, None, list(stride), list(padding), list(dilation), groups), fmt)
    sdt = _stat_dtype(x)
    g = None if gamma is None else gamma.to(sdt) if x.dtype == torch.float64 else gamma
    b = None if beta is None else beta.to(sdt) if x.dtype == torch.float64 else beta
    if g is not None and b is None:
        b = torch.zeros_like(g)
    out, mean, invstd = torch.ops.aten.native_batch_norm(y, g, b, None, None, True, 0.0, eps)
    mean, invstd = mean.to(sdt), invstd.to(sdt)
    # biased variance back from invstd = 1/sqrt(var + eps), in float64 (exact to fp32 rounding of invstd)
    var = (invstd.double().reciprocal().square() - eps).clamp_min(0.0).to(sdt)
    out = as_canonical(out, fmt)
    if residual is not None:
        out.add_(residual)
    if relu:
        out.relu_()
    return out, y, mean, var


def bn_act_train_backward(grad, out, y, mean, var, gamma, eps, relu):
    """(dy, gz, dgamma, dbeta) of out = act(y_hat * gamma + beta + residual), y_hat from batch stats.

    gz = dL/d(pre-activation) (also the residual's gradient); with batch statistics
    dy = gamma * invstd * (gz - mean(gz) - y_hat * mean(gz * y_hat)) per channel: ATen's fused
    batch-norm backward (one reduction + one elementwise pass). gz is returned only under ReLU
    (empty otherwise: it is `grad` itself, passed through uncopied).
    """
    fmt = out_memory_format(y)
    g = torch.ops.aten.threshold_backward(grad, out, 0) if relu else grad
    if g.dtype != y.dtype:
        g = g.to(y.dtype)
    g = as_canonical(g, fmt)
    invstd = torch.rsqrt(var.double() + eps).to(mean.dtype)
    gam = gamma
    if gam is not None and y.dtype == torch.float64:
        gam = gam.double()
    if gam is None:
        gam = torch.ones_like(mean)
    dy, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
        g, y, gam, None, None, mean, invstd, True, eps, [True, True, True])
    gz = g if relu else grad.new_empty(0)
    return as_canonical(dy, fmt), gz, dgamma.to(mean.dtype), dbeta.to(mean.dtype)


def bn_update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    """nn.BatchNorm2d's update, in fp32/fp64, written back in the buffers' own dtype."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:  # cumulative moving average
        factor = 1.0 / num_batches_tracked.to(torch.float64) if num_batches_tracked is not None else 0.0
    else:
        factor = momentum
    unbiased = var * (count / (count - 1)) if count > 1 else var
    for buf, new in ((running_mean, mean), (running_var, unbiased)):
        nd = new.to(torch.float64 if buf.dtype == torch.float64 else torch.float32)
        if isinstance(factor, torch.Tensor):
            f = factor.to(nd.dtype)
            upd = buf.to(nd.dtype) * (1 - f) + nd * f
        else:
            upd = buf.to(nd.dtype) * (1 - factor) + nd * factor
        buf.copy_(upd)
