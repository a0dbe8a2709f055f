"""auto's backend selection: routing rules, and the per-signature check of a GPU candidate
against the torch backend before auto may take it (so a kernel that is wrong on some GPU or
shape is never picked). On CPU the Triton interpreter stands in for a GPU candidate."""
import warnings

import pytest
import torch

import resnet_kernels as rk
from resnet_kernels import backends
from conftest import triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton (interpreter) is not available here")


def _case(residual=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 8, 6, 6, generator=g)
    w = torch.randn(8, 8, 3, 3, generator=g) * 0.2
    s = torch.rand(8, generator=g) + 0.5
    b = torch.randn(8, generator=g)
    r = torch.randn(1, 8, 6, 6, generator=g) if residual else None
    return x, w, s, b, r


def _call(s, b, r):
    return (s, b, r, (1, 1), (1, 1), (1, 1), 1, True)


@pytest.fixture
def triton_as_gpu_candidate(monkeypatch):
    monkeypatch.setattr(backends, "_candidates", lambda x: ("triton",))
    monkeypatch.setattr(backends, "_VERDICTS", {})
    monkeypatch.setattr(backends, "_CHOICES", {})
    monkeypatch.delenv("RESNET_KERNELS_BACKEND", raising=False)
    # The check alone (no timing): the interpreter would lose every race against torch.
    # Measured selection and its disk cache: tests/test_autotune_cache.py.
    monkeypatch.setenv("RESNET_KERNELS_AUTOTUNE", "0")


@needs_triton
def test_auto_takes_a_candidate_only_after_it_agrees_with_torch(triton_as_gpu_candidate):
    x, w, s, b, r = _case()
    assert backends.resolve("auto", x, w, 1, call=_call(s, b, r)) == "triton"
    [(key, verdict)] = backends.verdicts().items()
    assert verdict is True and key[0] == "triton"
    y = rk.fused_conv_bn_act(x, w, s, b, r, padding=1)  # same signature: no second check
    assert len(backends.verdicts()) == 1
    ref = rk.fused_conv_bn_act(x, w, s, b, r, padding=1, backend="torch")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@needs_triton
def test_a_wrong_candidate_is_reported_and_never_taken(triton_as_gpu_candidate, monkeypatch):
    real_run = backends.run

    def broken(name, x, *a):
        y = real_run(name, x, *a)
        return y + 0.5 if name == "triton" else y  # an off-by-something kernel

    monkeypatch.setattr(backends, "run", broken)
    x, w, s, b, r = _case()
    with pytest.warns(RuntimeWarning, match="disagrees with the torch backend"):
        assert backends.resolve("auto", x, w, 1, call=_call(s, b, r)) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per signature, then skipped quietly
        y = rk.fused_conv_bn_act(x, w, s, b, r, padding=1)
    torch.testing.assert_close(y, real_run("torch", x, w, s, b, r, [1, 1], [1, 1], [1, 1], 1, True))


@needs_triton
def test_a_crashing_candidate_is_a_verdict_not_a_crash(triton_as_gpu_candidate, monkeypatch):
    real_run = backends.run

    def crash(name, *a):
        if name == "triton":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_run(name, *a)

    monkeypatch.setattr(backends, "run", crash)
    x, w, s, b, r = _case()
    with pytest.warns(RuntimeWarning, match="illegal memory access"):
        assert backends.resolve("auto", x, w, 1, call=_call(s, b, r)) == "torch"


@needs_triton
def test_each_signature_is_checked_on_its_own(triton_as_gpu_candidate):
    x, w, s, b, r = _case()
    backends.resolve("auto", x, w, 1, call=_call(s, b, r))
    backends.resolve("auto", x, w, 1, call=_call(s, b, None))  # no residual
    xc = x.contiguous(memory_format=torch.channels_last)
    backends.resolve("auto", xc, w, 1, call=_call(s, b, r))  # other strides
    backends.resolve("auto", x.half(), w.half(), 1, call=_call(s, b, r.half()))  # other dtype
    assert len(backends.verdicts()) == 4 and all(backends.verdicts().values())


def test_nan_placement_must_match(monkeypatch):
    real_run = backends.run
    x, w, s, b, r = _case()
    x[0, 0, 2, 2] = float("nan")
    monkeypatch.setattr(backends, "run", lambda name, *a: real_run("torch", *a).nan_to_num(0.0))
    ok, why = backends._check("triton", x, w, _call(s, b, r))
    assert not ok and "non-finite" in why


@needs_triton
def test_no_check_while_tracing_or_capturing(triton_as_gpu_candidate, monkeypatch):
    monkeypatch.setattr(backends, "_cannot_check", lambda: True)
    x, w, s, b, r = _case()
    assert backends.resolve("auto", x, w, 1, call=_call(s, b, r)) == "torch"  # unverified: torch
    assert backends.verdicts() == {}
    monkeypatch.setattr(backends, "_cannot_check", lambda: False)
    assert backends.resolve("auto", x, w, 1, call=_call(s, b, r)) == "triton"
    monkeypatch.setattr(backends, "_cannot_check", lambda: True)
    assert backends.resolve("auto", x, w, 1, call=_call(s, b, r)) == "triton"  # verified eagerly before


def test_cuda_backend_rules_are_named():
    x, w, s, b, r = _case()
    ok, why = backends.supports("cuda", x, w, 1)
    assert not ok and ("not available" in why or "CUDA tensors" in why)
    with pytest.raises(rk.BackendUnavailable, match="cuda"):
        rk.fused_conv_bn_act(x, w, s, b, r, padding=1, backend="cuda")


def test_cuda_backend_dtype_and_groups_rules(monkeypatch):
    """The routing rules of the cuda backend, checked with the availability gate opened (the
    rules themselves only look at device type, dtype, groups and capability)."""
    monkeypatch.setitem(backends._STATUS, "cuda", (True, "test"))
    monkeypatch.setattr(backends, "_capability", lambda dev: (9, 0))

    class Dev:
        type = "cuda"
        index = 0

    class T:
        def __init__(self, dtype):
            self.dtype, self.device = dtype, Dev()

    assert backends.supports("cuda", T(torch.float16), None, 1) == (True, "")
    assert backends.supports("cuda", T(torch.bfloat16), None, 1) == (True, "")
    ok, why = backends.supports("cuda", T(torch.float32), None, 1)
    assert not ok and "float16/bfloat16" in why
    ok, why = backends.supports("cuda", T(torch.float16), None, 32)
    assert not ok and "groups=1" in why
    monkeypatch.setattr(backends, "_capability", lambda dev: (7, 5))
    ok, why = backends.supports("cuda", T(torch.float16), None, 1)
    assert not ok and "8.0" in why


def test_cpu_auto_is_torch_without_any_check():
    x, w, s, b, r = _case()
    before = dict(backends.verdicts())
    assert backends.resolve("auto", x, w, 1, call=_call(s, b, r)) == "torch"
    assert backends.verdicts() == before
