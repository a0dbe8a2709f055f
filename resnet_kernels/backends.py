"""Which backends this install can run, and which one serves a call.

`torch` runs everywhere. `triton` runs on a CUDA GPU, or on CPU tensors when TRITON_INTERPRET=1
was set before import (the interpreter: slow, for tests). `cuda` is the hand-written CUDA C++
backend: it needs the extension built with nvcc and a GPU.

`auto` picks, per call, the first backend in the preference order that is available and
supports the call's geometry and dtype: on CUDA devices cuda > triton > torch; on CPU always
torch (the interpreter is a correctness tool, never a speed path). On CUDA a candidate is only
taken for a call signature (shapes, strides class, dtype, geometry, device) after it has been
checked once against the torch backend on that call's own inputs: a kernel that is wrong on
some GPU or shape is never picked (it is reported once with a warning and skipped). Under
torch.compile tracing or CUDA-graph capture no check can run, so only already-verified
candidates are taken there and torch serves the rest. RESNET_KERNELS_BACKEND overrides `auto`
(no check). A backend asked for by name that cannot serve a call raises.

Measured choice: where more than one backend could serve a call, auto times every candidate that
passed the check, and the torch backend, on the call's own inputs the first time a signature is
seen, and takes the fastest. The choice is remembered per process and on disk per device
(_autotune.py: one JSON file per device, safe under concurrent processes, ignored when the
library, torch/triton or the device changes), so later processes skip the timing; they still run
the correctness check before taking a stored candidate. RESNET_KERNELS_AUTOTUNE=0 turns the timing
off (the first checked candidate in preference order is taken, as before).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import time
import warnings

import torch

from . import _autotune
from ._geometry import as_canonical, is_channels_last, out_memory_format  # noqa: F401  (is_channels_last: re-exported)

NAMES = ("torch", "triton", "cuda")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)


class BackendUnavailable(NotImplementedError):
    """A backend was asked for by name and cannot serve this call."""


def _triton_status():
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "Triton interpreter (TRITON_INTERPRET=1): CPU tensors, slow, for testing"
    if torch.cuda.is_available():
        return True, f"Triton on {torch.cuda.get_device_name()}"
    return False, "no CUDA GPU visible and TRITON_INTERPRET=1 was not set before import"


def _cuda_status():
    from . import _C_STATUS

    loaded, why = _C_STATUS
    if not loaded:
        return False, f"the C++ extension did not load: {why}"
    info = torch.ops.resnet_kernels.build_info()
    if "cuda=1" not in info:
        return False, "the C++ extension was built without CUDA (nvcc was not found at build time)"
    if not hasattr(torch.ops.resnet_kernels, "conv_bn_act_cuda"):
        return False, "the hand-written CUDA implicit-GEMM kernels are not part of this build yet"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible"
    return True, f"CUDA kernels ({info}) on {torch.cuda.get_device_name()}"


# Decided once, at import: what the install and the machine allow does not change in a process,
# and plain constants keep backend selection traceable by torch.compile.
_STATUS = {"torch": (True, f"ATen composite (torch {torch.__version__})"),
           "triton": _triton_status(), "cuda": _cuda_status()}
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def status():
    """{backend name: (available, reason)} for this process."""
    return dict(_STATUS)


def available_backends():
    """Names of the backends that can run here, in `auto`'s preference order for CUDA."""
    return [n for n in ("cuda", "triton", "torch") if _STATUS[n][0]]


def _triton_module():
    return importlib.import_module("resnet_kernels.triton.conv_bn_act")


def supports(name, x, weight, groups):
    """(True, "") if backend `name` can serve this call here, else (False, the rule it breaks).

    Only routing rules are checked here; argument validity is check_args' job.
    """
    if name not in NAMES:
        return False, f"unknown backend {name!r}; choose from {('auto',) + NAMES}"
    ok, why = _STATUS[name]
    if not ok:
        return False, f"backend {name!r} is not available: {why}"
    if name == "torch":
        return True, ""
    dev = x.device.type
    if name == "triton":
        if x.dtype not in _TRITON_DTYPES:
            return False, f"backend 'triton' supports float32/float16/bfloat16, got {x.dtype}"
        if groups != 1:
            return False, f"backend 'triton' supports groups=1 only, got groups={groups}"
        if dev != "cuda" and not (dev == "cpu" and _INTERPRET):
            return False, f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {dev}"
        return True, ""
    if dev != "cuda":
        return False, f"backend 'cuda' needs CUDA tensors, got x on {dev}"
    if x.dtype not in _CUDA_DTYPES:
        return False, (f"backend 'cuda' runs float16/bfloat16 on tensor cores, got {x.dtype} "
                       "(auto sends float32 to triton or torch)")
    if groups != 1:
        return False, f"backend 'cuda' supports groups=1 only, got groups={groups} (auto sends groups to torch)"
    major = _capability(x.device)[0]
    if major < 8:
        return False, f"backend 'cuda' needs compute capability 8.0 or newer (mma.sync with bf16), got {major}.x"
    return True, ""


# Read once at import (like _STATUS): plain constants keep routing traceable by torch.compile.
_CAPS = {i: torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())} \
    if torch.cuda.is_available() else {}


def _capability(device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return _CAPS.get(idx, (0, 0))


# --- auto's per-signature check of each candidate against the torch backend -------------------------
# {signature: True (verified) | False (wrong here: never taken)}; per process. (A disk cache shared
# by processes comes with measured selection.)
_VERDICTS = {}
_VERDICT_LOCK = threading.Lock()
# Max relative difference to the torch backend (same dtype, fp32 accumulation in both) that a
# candidate may show: a few output ulps of the dtype, far below any real indexing or fragment bug
# (those give O(1) errors) and above two correct fp32-accumulated results' rounding disagreement.
_CHECK_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4}


def _signature(name, x, weight, call):
    scale, shift, residual, stride, padding, dilation, groups, relu = call
    # Alignment class from the storage offset (allocations are 16-byte aligned; works on fake
    # tensors too, so traced code finds eager's verdicts).
    res = None if residual is None else (tuple(residual.stride()), _align(residual))
    return (name, str(x.device), x.dtype, tuple(x.shape), tuple(x.stride()), _align(x),
            tuple(weight.shape), tuple(weight.stride()), tuple(stride), tuple(padding), tuple(dilation),
            int(groups), bool(relu), res, _tf32_allowed())


def _align(t):
    return (t.storage_offset() * t.element_size()) % 16


def _tf32_allowed():
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def _cannot_check():
    if torch.compiler.is_compiling():
        return True
    try:
        return torch.cuda.is_current_stream_capturing()
    except Exception:  # pragma: no cover  (no CUDA runtime)
        return False


def _agree(got, want, dtype):
    """(ok, why): got has want's shape, strides and non-finite pattern, and differs from it by at
    most a few output ulps of dtype (relative to max|want|)."""
    if got.shape != want.shape or got.stride() != want.stride():
        return False, f"shape/strides {tuple(got.shape)}/{got.stride()} != {tuple(want.shape)}/{want.stride()}"
    g, w = got.double(), want.double()
    finite = torch.isfinite(w)
    if not torch.equal(torch.isfinite(g), finite) or not torch.equal(torch.isnan(g), torch.isnan(w)):
        return False, "non-finite values differ from the torch backend"
    diff = ((g - w).abs()[finite].max() / (w.abs()[finite].max() + 1e-6)).item() if finite.any() else 0.0
    tol = _CHECK_TOL.get(dtype, 1e-4) * (10 if dtype == torch.float32 and _tf32_allowed() else 1)
    return diff <= tol, f"max relative difference {diff:.3g} to the torch backend (allowed {tol:.1g})"


def _check(name, x, weight, call):
    """Run candidate `name` and the torch backend on this call's inputs; True when they agree."""
    scale, shift, residual, stride, padding, dilation, groups, relu = call
    from . import reference
    with torch.no_grad():
        try:
            got = run(name, x, weight, scale, shift, residual, stride, padding, dilation, groups, relu)
        except Exception as e:  # a launch or capability failure is a verdict too, never a crash mid-model
            return False, f"{type(e).__name__}: {e}"
        want = reference.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu)
        return _agree(got, want, x.dtype)


def _check_train(name, x, weight, call):
    """Training forward of candidate `name` vs the torch backend on this call's inputs: the output
    and the batch mean and variance must agree (no running statistics are touched)."""
    gamma, beta, residual, stride, padding, dilation, groups, eps, relu = call
    from . import reference
    with torch.no_grad():
        try:
            got = run_train(name, x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps, relu)
        except Exception as e:
            return False, f"{type(e).__name__}: {e}"
        want = reference.conv_bn_train(x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps,
                                       relu)
        for what, g, w in (("out", got[0], want[0]), ("mean", got[2], want[2]), ("var", got[3], want[3])):
            ok, why = _agree(g, w, x.dtype)
            if not ok:
                return False, f"{what}: {why}"
        return True, ""


def _verified(name, x, weight, call, train=False):
    if train:
        gamma, beta, residual, stride, padding, dilation, groups, eps, relu = call
        key = ("train", gamma is None, beta is None, float(eps)) + _signature(
            name, x, weight, (None, None, residual, stride, padding, dilation, groups, relu))
    else:
        key = _signature(name, x, weight, call)
    verdict = _VERDICTS.get(key)
    if verdict is not None or _cannot_check():
        return bool(verdict)
    ok, why = (_check_train if train else _check)(name, x, weight, call)
    with _VERDICT_LOCK:
        _VERDICTS[key] = ok
    if not ok:
        warnings.warn(f"resnet_kernels: backend {name!r} disagrees with the torch backend on this "
                      f"{'training ' if train else ''}call (x {tuple(x.shape)} {x.dtype}, weight "
                      f"{tuple(weight.shape)}, stride {tuple(call[-6 if train else 3])}, padding "
                      f"{tuple(call[-5 if train else 4])}, dilation {tuple(call[-4 if train else 5])}): {why}; "
                      "auto will not use it for this signature. Please report it (python -m resnet_kernels info).",
                      RuntimeWarning)
    return ok


def _candidates(x):
    """GPU candidates auto may take before falling back to torch (none on CPU: the Triton
    interpreter is a correctness tool, not a speed path)."""
    return ("cuda", "triton") if x.device.type == "cuda" else ()


def verdicts():
    """{signature: verified?} of auto's checks so far in this process."""
    return dict(_VERDICTS)


# --- auto's measured choice ----------------------------------------------------------------------------
# {choice key: backend name} for this process; a candidate appears here only after it passed _check.
_CHOICES = {}


def choices():
    """{choice key: backend} that auto settled on in this process (see choice_key)."""
    return dict(_CHOICES)


def choice_key(x, weight, call):
    """A readable, process-independent string naming the call signature (without the device, which
    selects the cache file): shapes, strides, alignment, dtype, geometry, epilogue, TF32 flag."""
    sig = _signature("", x, weight, call)[2:]  # drop name and device
    dtype, xs, xst, xal, ws, wst, st, pad, dil, groups, relu, res, tf32 = sig
    j = lambda t: "x".join(map(str, t))  # noqa: E731
    r = "none" if res is None else f"{j(res[0])}@{res[1]}"
    return (f"{str(dtype).replace('torch.', '')}|x={j(xs)}/{j(xst)}@{xal}|w={j(ws)}/{j(wst)}|stride={j(st)}"
            f"|pad={j(pad)}|dil={j(dil)}|groups={groups}|relu={int(relu)}|res={r}|tf32={int(tf32)}")


def _autotune_on():
    return os.environ.get("RESNET_KERNELS_AUTOTUNE", "1").strip().lower() not in ("0", "off", "false", "no")


def _measure(names, x, weight, call, min_sample_s=1e-3, rounds=5):
    """{name: median seconds per call} of each backend on this call's inputs.

    One warm-up call each, then `rounds` interleaved samples; each sample repeats the call enough
    times to last about min_sample_s (small layers take microseconds on a GPU), timed with
    CUDA events on CUDA tensors and perf_counter elsewhere. A backend that raises gets inf."""
    scale, shift, residual, stride, padding, dilation, groups, relu = call
    on_cuda = x.device.type == "cuda"

    def fn(name):
        return lambda: run(name, x, weight, scale, shift, residual, stride, padding, dilation, groups, relu)

    fns, reps, out = {}, {}, {}
    with torch.no_grad():
        for name in names:
            f = fn(name)
            try:
                f()
                if on_cuda:
                    torch.cuda.synchronize(x.device)
                t0 = time.perf_counter()
                f()
                if on_cuda:
                    torch.cuda.synchronize(x.device)
                one = max(time.perf_counter() - t0, 1e-7)
            except Exception:  # noqa: BLE001 - a failing candidate just loses
                out[name] = float("inf")
                continue
            fns[name], reps[name] = f, max(1, min(1000, int(min_sample_s / one)))
        samples = {name: [] for name in fns}
        order = list(fns)
        for r in range(rounds):
            for name in order[r % len(order):] + order[:r % len(order)] if order else ():
                f, k = fns[name], reps[name]
                try:
                    if on_cuda:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        for _ in range(k):
                            f()
                        end.record()
                        end.synchronize()
                        samples[name].append(start.elapsed_time(end) * 1e-3 / k)
                    else:
                        t0 = time.perf_counter()
                        for _ in range(k):
                            f()
                        samples[name].append((time.perf_counter() - t0) / k)
                except Exception:  # noqa: BLE001
                    samples[name] = [float("inf")]
                    break
    for name, ts in samples.items():
        ts = sorted(ts)
        out[name] = ts[len(ts) // 2] if ts else float("inf")
    return out


def _choose(key, cands, x, weight, call):
    """Measured choice among the candidates that pass the check, and torch (eager, not tracing)."""
    cache = _autotune.cache_for(x.device)
    disk_key = choice_key(x, weight, call)
    entry = cache.get(disk_key) if cache is not None else None
    stored = entry.get("backend") if entry else None
    if stored == "torch" or (stored in cands and _verified(stored, x, weight, call)):
        name = stored
    else:
        verified = [n for n in cands if _verified(n, x, weight, call)]
        if not verified:
            name = "torch"  # every candidate failed its check here: nothing to measure, nothing to store
        else:
            times = _measure(verified + ["torch"], x, weight, call)
            name = min(times, key=lambda n: (times[n], n != "torch"))  # a tie keeps the reference
            if times[name] == float("inf"):
                name = "torch"
            elif cache is not None:
                cache.put(disk_key, {"backend": name, "when": _autotune.now(),
                                     "ms": {n: (round(t * 1e3, 6) if t != float("inf") else None)
                                            for n, t in times.items()}})
    with _VERDICT_LOCK:
        _CHOICES[key] = name
    return name


def _auto(x, weight, groups, call):
    cands = [n for n in _candidates(x) if supports(n, x, weight, groups)[0]]
    if not cands or call is None:
        return "torch"  # without the call's inputs no candidate can be checked
    if not _autotune_on():
        for name in cands:
            if _verified(name, x, weight, call):
                return name
        return "torch"
    key = (str(x.device), choice_key(x, weight, call))
    name = _CHOICES.get(key)
    if name is not None:
        return name
    if _cannot_check():  # tracing or capture: no check, no timing; only what eager already verified
        for name in cands:
            if _VERDICTS.get(_signature(name, x, weight, call)) is True:
                return name
        return "torch"
    return _choose(key, cands, x, weight, call)


def resolve(backend, x, weight, groups, call=None):
    """The concrete backend that serves this call.

    call: (scale, shift, residual, stride, padding, dilation, groups, relu) of the call, which
    lets `auto` check a GPU candidate on the call's own inputs before taking it (without it,
    auto takes torch), and time the checked candidates against torch.
    """
    if backend == "auto":
        backend = os.environ.get("RESNET_KERNELS_BACKEND", "auto") or "auto"
        if backend == "auto":
            return _auto(x, weight, groups, call)
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {backend!r}")
    ok, why = supports(backend, x, weight, groups)
    if not ok:
        raise BackendUnavailable(why)
    return backend


_INTERPRETER_LOCK = threading.Lock()


def _interpreter_lock(t):
    """Triton's CPU interpreter keeps the running program's state in globals, so two threads
    interpreting kernels at once corrupt each other (seen as wrong results or InterpreterError).
    Interpreted launches are serialised; GPU launches are not affected."""
    import contextlib
    return _INTERPRETER_LOCK if _INTERPRET and t.device.type != "cuda" else contextlib.nullcontext()


def run(backend, x, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    """Run a resolved backend (the op's CPU/CUDA implementation calls this)."""
    if backend == "torch":
        from . import reference
        return reference.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu)
    ok, why = supports(backend, x, weight, groups)
    if not ok:
        raise BackendUnavailable(why)
    if backend == "triton":
        with _interpreter_lock(x):
            return _triton_module().conv_bn_act(x, weight, scale, shift, residual, tuple(stride), tuple(padding),
                                                tuple(dilation), relu)
    if backend == "cuda":
        # The kernels write NHWC; the op's contract is the input's memory format. They read the
        # residual in x's dtype (an fp32 residual of fp16/bf16 x is rounded first).
        if residual is not None and residual.dtype != x.dtype:
            residual = residual.to(x.dtype)
        y = torch.ops.resnet_kernels.conv_bn_act_cuda(x, weight, scale, shift, residual, list(stride),
                                                      list(padding), list(dilation), groups, relu)
        return as_canonical(y, out_memory_format(x))
    raise ValueError(f"backend must be one of {NAMES} here, got {backend!r}")


# --- training (BN with batch statistics) -----------------------------------------------------------
def resolve_train(backend, x, weight, groups, call=None):
    """The backend for a training-mode call. auto: torch on CPU; on CUDA the first of cuda, triton
    that supports the call and whose forward (output, batch mean and variance) has agreed with the
    torch backend on this call signature (checked once per process, like inference), else torch.

    call: (gamma, beta, residual, stride, padding, dilation, groups, eps, relu).
    """
    if backend == "auto":
        backend = os.environ.get("RESNET_KERNELS_BACKEND", "auto") or "auto"
        if backend == "auto":
            for name in _candidates(x):
                if supports_train(name, x, weight, groups)[0] and (
                        call is None or _verified(name, x, weight, call, train=True)):
                    return name
            return "torch"
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {backend!r}")
    ok, why = supports_train(backend, x, weight, groups)
    if not ok:
        raise BackendUnavailable(why)
    return backend


def supports_train(name, x, weight, groups):
    """Training support: the same rules as inference (the cuda backend: fp16/bf16, groups=1, sm80+)."""
    return supports(name, x, weight, groups)


def run_train(backend, x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps, relu):
    if backend == "torch":
        from . import reference
        return reference.conv_bn_train(x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps,
                                       relu)
    ok, why = supports_train(backend, x, weight, groups)
    if not ok:
        raise BackendUnavailable(why)
    if backend == "cuda":
        return _cuda_conv_bn_train(x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps, relu)
    with _interpreter_lock(x):
        return _triton_train_module().conv_bn_train(x, weight, gamma, beta, residual, tuple(stride),
                                                    tuple(padding), tuple(dilation), eps, relu)


def _cuda_conv_bn_train(x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps, relu):
    """(out, y, mean, var) on the CUDA C++ kernels: the implicit-GEMM conv with the statistics
    epilogue (csrc/cuda/conv_common.cuh: raw y + per-tile sums), Chan's combine of the tiles, and
    one out-of-place normalise/residual/ReLU pass (csrc/cuda/epilogue.cu, bn_act_apply_cuda)."""
    from ._stats import affine_from_stats, chan_combine
    y, psum, pm2, pcnt = torch.ops.resnet_kernels.conv_bn_stats_cuda(x, weight, list(stride), list(padding),
                                                                     list(dilation), groups)
    fmt = out_memory_format(x)
    y = as_canonical(y, fmt)
    M = y.numel() // max(y.shape[1], 1)
    mean, var = chan_combine(psum, pm2, pcnt, M)
    a, b = affine_from_stats(mean, var, gamma, beta, eps)
    if residual is not None and residual.dtype != y.dtype:
        # an fp32 shortcut of fp16/bf16 activations (autocast) is added in fp32, like torchvision
        from . import reference
        out = reference.bn_act_apply(y, mean, var, gamma, beta, residual, eps, relu, fmt)
    else:
        out = as_canonical(torch.ops.resnet_kernels.bn_act_apply_cuda(y, a, b, residual, relu), fmt)
    return out, y, mean, var


def run_train_backward(backend, grad, out, y, mean, var, gamma, eps, relu):
    if backend == "triton" and (y.is_cuda or _INTERPRET):
        with _interpreter_lock(y):
            return _triton_train_module().bn_act_train_backward(grad, out, y, mean, var, gamma, eps, relu)
    from . import reference
    return reference.bn_act_train_backward(grad, out, y, mean, var, gamma, eps, relu)


def _triton_train_module():
    return importlib.import_module("resnet_kernels.triton.conv_bn_train")
