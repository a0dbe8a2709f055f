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
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import warnings

import torch

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
        if got.shape != want.shape or got.stride() != want.stride():
            return False, f"shape/strides {tuple(got.shape)}/{got.stride()} != {tuple(want.shape)}/{want.stride()}"
        g, w = got.double(), want.double()
        finite = torch.isfinite(w)
        if not torch.equal(torch.isfinite(g), finite) or not torch.equal(torch.isnan(g), torch.isnan(w)):
            return False, "non-finite values differ from the torch backend"
        diff = ((g - w).abs()[finite].max() / (w.abs()[finite].max() + 1e-6)).item() if finite.any() else 0.0
        tol = _CHECK_TOL.get(x.dtype, 1e-4) * (10 if x.dtype == torch.float32 and _tf32_allowed() else 1)
        return diff <= tol, f"max relative difference {diff:.3g} to the torch backend (allowed {tol:.1g})"


def _verified(name, x, weight, call):
    key = _signature(name, x, weight, call)
    verdict = _VERDICTS.get(key)
    if verdict is not None or _cannot_check():
        return bool(verdict)
    ok, why = _check(name, x, weight, call)
    with _VERDICT_LOCK:
        _VERDICTS[key] = ok
    if not ok:
        warnings.warn(f"resnet_kernels: backend {name!r} disagrees with the torch backend on this call "
                      f"(x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)}, stride {tuple(call[3])}, "
                      f"padding {tuple(call[4])}, dilation {tuple(call[5])}): {why}; auto will not use it for "
                      "this signature. Please report it (python -m resnet_kernels info).", RuntimeWarning)
    return ok


def _candidates(x):
    """GPU candidates auto may take before falling back to torch (none on CPU: the Triton
    interpreter is a correctness tool, not a speed path)."""
    return ("cuda", "triton") if x.device.type == "cuda" else ()


def verdicts():
    """{signature: verified?} of auto's checks so far in this process."""
    return dict(_VERDICTS)


def resolve(backend, x, weight, groups, call=None):
    """The concrete backend that serves this call.

    call: (scale, shift, residual, stride, padding, dilation, groups, relu) of the call, which
    lets `auto` check a GPU candidate on the call's own inputs before taking it.
    """
    if backend == "auto":
        backend = os.environ.get("RESNET_KERNELS_BACKEND", "auto") or "auto"
        if backend == "auto":
            for name in _candidates(x):
                if supports(name, x, weight, groups)[0] and (call is None or _verified(name, x, weight, call)):
                    return name
            return "torch"
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {backend!r}")
    ok, why = supports(backend, x, weight, groups)
    if not ok:
        raise BackendUnavailable(why)
    return backend


def run(backend, x, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    """Run a resolved backend (the op's CPU/CUDA implementation calls this)."""
    if backend == "torch":
        from . import reference
        return reference.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu)
    ok, why = supports(backend, x, weight, groups)
    if not ok:
        raise BackendUnavailable(why)
    if backend == "triton":
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
def resolve_train(backend, x, weight, groups):
    """The backend for a training-mode call. auto: torch on CPU; on CUDA the first of triton,
    torch that supports the call (the training kernels are checked by the test suite and the
    device check, not per call: a per-call check would double every training step's cost)."""
    if backend == "auto":
        backend = os.environ.get("RESNET_KERNELS_BACKEND", "auto") or "auto"
        if backend == "auto":
            if x.device.type == "cuda" and supports_train("triton", x, weight, groups)[0]:
                return "triton"
            return "torch"
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {backend!r}")
    ok, why = supports_train(backend, x, weight, groups)
    if not ok:
        raise BackendUnavailable(why)
    return backend


def supports_train(name, x, weight, groups):
    if name == "cuda":
        return False, "backend 'cuda' has no training (batch-statistics) kernels yet; use 'triton' or 'torch'"
    return supports(name, x, weight, groups)


def run_train(backend, x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps, relu):
    if backend == "torch":
        from . import reference
        return reference.conv_bn_train(x, weight, gamma, beta, residual, stride, padding, dilation, groups, eps,
                                       relu)
    ok, why = supports_train(backend, x, weight, groups)
    if not ok:
        raise BackendUnavailable(why)
    return _triton_train_module().conv_bn_train(x, weight, gamma, beta, residual, tuple(stride), tuple(padding),
                                                tuple(dilation), eps, relu)


def run_train_backward(backend, grad, out, y, mean, var, gamma, eps, relu):
    if backend == "triton" and (y.is_cuda or _INTERPRET):
        return _triton_train_module().bn_act_train_backward(grad, out, y, mean, var, gamma, eps, relu)
    from . import reference
    return reference.bn_act_train_backward(grad, out, y, mean, var, gamma, eps, relu)


def _triton_train_module():
    return importlib.import_module("resnet_kernels.triton.conv_bn_train")
