"""Concurrency: one converted model used by two threads at once, auto's checked-selection cache
filled by two threads at once, and (GPU only) the same model on two CUDA streams.

Every output is compared with a float64 oracle and with the same input run alone, so a race in the
weight / BN-constant caches (a folded weight of one geometry used for another, a half-written plan)
shows as a wrong value, not only as an exception. (The on-disk autotune cache shared by processes
is tested with that cache.)
"""
import copy
import threading

import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

import resnet_kernels as rk
from resnet_kernels import backends
from conftest import assert_matches, randomize_bn, triton_available


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        BasicBlock(16, 16),
        BasicBlock(16, 32, 2, nn.Sequential(conv1x1(16, 32, 2), nn.BatchNorm2d(32))),
        Bottleneck(32, 8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return randomize_bn(m, gamma=(0.5, 1.0)).eval()


def _run_threads(fn, n_threads=2):
    errors, barrier = [], threading.Barrier(n_threads)

    def body(i):
        try:
            barrier.wait()
            fn(i)
        except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_two_threads_share_one_converted_model():
    """Two threads, each with its own input sizes and layouts (so the caches hold several geometries
    and plans at once), run the same converted model concurrently, from cold caches."""
    model = _model()
    fast = rk.convert(copy.deepcopy(model))
    rk.clear_caches()
    g = torch.Generator().manual_seed(1)
    inputs = {0: [torch.randn(2, 3, 32, 32, generator=g), torch.randn(1, 3, 24, 40, generator=g)],
              1: [torch.randn(3, 3, 28, 28, generator=g).contiguous(memory_format=torch.channels_last),
                  torch.randn(2, 3, 32, 32, generator=g)]}
    with torch.no_grad():
        ref64 = {i: [copy.deepcopy(model).double()(x.double()) for x in xs] for i, xs in inputs.items()}
        eager = {i: [model(x) for x in xs] for i, xs in inputs.items()}
    outs = {0: [], 1: []}

    def work(i):
        with torch.no_grad():
            for _ in range(4):
                for x in inputs[i]:
                    outs[i].append(fast(x))

    _run_threads(work)
    for i, xs in inputs.items():
        assert len(outs[i]) == 4 * len(xs)
        for j, y in enumerate(outs[i]):
            assert_matches(y, ref64[i][j % len(xs)], eager[i][j % len(xs)], torch.float32)
    with torch.no_grad():  # and the same values as each input run alone afterwards
        for i, xs in inputs.items():
            for j, x in enumerate(xs):
                torch.testing.assert_close(outs[i][-len(xs) + j], fast(x), rtol=1e-5, atol=1e-5)


def test_two_threads_while_the_bn_statistics_change_between_calls():
    """One thread runs the model while the other replaces BN statistics (load_state_dict) and then
    runs it too: after the change every call sees the new statistics (no stale folded constants)."""
    model = _model()
    fast = rk.convert(copy.deepcopy(model))
    new_state = randomize_bn(copy.deepcopy(model), seed=7, gamma=(0.5, 1.0)).state_dict()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before, after = model(x), copy.deepcopy(model).eval()
        after.load_state_dict(new_state)
        after = after(x)
    changed = threading.Event()
    seen = []

    def work(i):
        with torch.no_grad():
            if i == 0:
                for _ in range(3):
                    fast(x)
                fast.load_state_dict(new_state)
                changed.set()
            else:
                changed.wait(timeout=120)
            for _ in range(3):
                seen.append(fast(x))

    _run_threads(work)
    assert not torch.allclose(before, after)
    for y in seen:
        torch.testing.assert_close(y, after, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not triton_available(), reason="Triton (interpreter) is not available here")
def test_two_threads_fill_autos_checked_selection_cache(monkeypatch):
    """auto's per-signature check of a candidate (the Triton interpreter stands in for a GPU
    candidate) run by two threads at once on the same and on different signatures: every result
    is right and each signature ends with one verdict."""
    monkeypatch.setattr(backends, "_candidates", lambda x: ("triton",))
    monkeypatch.setattr(backends, "_VERDICTS", {})
    if hasattr(backends, "_CHOICES"):
        monkeypatch.setattr(backends, "_CHOICES", {})
    monkeypatch.delenv("RESNET_KERNELS_BACKEND", raising=False)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 8, 3, 3, generator=g) * 0.2
    s, b = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    xs = {0: torch.randn(1, 8, 6, 6, generator=g), 1: torch.randn(1, 8, 6, 6, generator=g),  # same signature
          2: torch.randn(2, 8, 5, 7, generator=g)}  # another one
    results = {}

    def work(i):
        for j in (0, 1) if i == 0 else (1, 2):
            results[(i, j)] = rk.fused_conv_bn_act(xs[j], w, s, b, padding=1)

    _run_threads(work)
    for (i, j), y in results.items():
        ref = torch.relu(torch.nn.functional.conv2d(xs[j].double(), w.double(), None, 1, 1)
                         * s.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1))
        assert_matches(y, ref, dtype=torch.float32)
    verdicts = backends.verdicts()
    assert len(verdicts) == 2 and all(verdicts.values()), verdicts
    call = (s, b, None, (1, 1), (1, 1), (1, 1), 1, True)
    assert backends.resolve("auto", xs[0], w, 1, call=call) in ("triton", "torch")  # checked, then measured
    assert len(backends.verdicts()) == 2  # no second check of a known signature


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_two_cuda_streams_share_one_converted_model(dtype):
    """The same converted model launched on two CUDA streams at once (each op on torch's current
    stream) gives, on each stream, the result of running that input alone."""
    model = _model()
    fast = rk.convert(copy.deepcopy(model)).to("cuda", dtype)
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(8, 3, 64, 64, generator=g).to("cuda", dtype) for _ in range(2)]
    with torch.no_grad():
        alone = [fast(x) for x in xs]  # warm: auto's checks and Triton compiles happen here
        torch.cuda.synchronize()
        streams = [torch.cuda.Stream() for _ in xs]
        outs = [[], []]
        for s in streams:
            s.wait_stream(torch.cuda.current_stream())
        for _ in range(5):
            for i, (s, x) in enumerate(zip(streams, xs)):
                with torch.cuda.stream(s):
                    outs[i].append(fast(x))
        torch.cuda.synchronize()
        ref64 = [copy.deepcopy(model).double()(x.double().cpu()) for x in xs]
        eager = [copy.deepcopy(model).to("cuda", dtype)(x) for x in xs]
    for i in range(2):
        for y in outs[i]:
            torch.testing.assert_close(y, alone[i], rtol=0, atol=0)  # same kernels, same inputs: bitwise
        assert_matches(alone[i], ref64[i], eager[i], dtype)
