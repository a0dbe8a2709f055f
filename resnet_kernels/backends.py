"""Which backends this install can run, and which one serves a call.

`torch` runs everywhere. `triton` runs on a CUDA GPU, or on CPU tensors when TRITON_INTERPRET=1
was set before import (the interpreter: slow, for tests). `cuda` is the hand-written CUDA C++
backend: it needs the extension built with nvcc and a GPU.

`auto` picks, per call, the first backend in the preference order that is available and
supports the call's geometry and dtype: on CUDA devices cuda > triton > torch; on CPU always
torch (the interpreter is a correctness tool, never a speed path). RESNET_KERNELS_BACKEND
overrides `auto`. A backend asked for by name that cannot serve a call raises.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from ._geometry import is_channels_last  # noqa: F401  (re-exported for backends)

NAMES = ("torch", "triton", "cuda")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    return True, ""


def resolve(backend, x, weight, groups):
    """The concrete backend that serves this call."""
    if backend == "auto":
        backend = os.environ.get("RESNET_KERNELS_BACKEND", "auto") or "auto"
        if backend == "auto":
            order = ("cuda", "triton", "torch") if x.device.type == "cuda" else ("torch",)
            for name in order:
                if supports(name, x, weight, groups)[0]:
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
        return torch.ops.resnet_kernels.conv_bn_act_cuda(x, weight, scale, shift, residual, stride, padding,
                                                         dilation, groups, relu)
    raise ValueError(f"backend must be one of {NAMES} here, got {backend!r}")
