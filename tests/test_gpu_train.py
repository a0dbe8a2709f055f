"""GPU checks of training mode (run by scripts/device_check.sh; skipped here with the reason).

- the training backends (triton, cuda when it has training kernels, torch) against a float64
  oracle over ResNet conv shapes: out, dx, dw, dgamma, dbeta, dresidual, under the tolerance rule;
- E4 (b): a training step that mutates running statistics under torch.compile(mode="reduce-overhead")
  updates them exactly once per call across warm-up, record and replay;
- E4 (c) for training: a manually captured CUDA graph of the fused training forward, replayed on
  new data, gives eager's outputs and statistics (one update per replay);
- an AMP (bf16) channels_last resnet18 training step next to torchvision.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resnet_kernels as rk
from resnet_kernels import backends
from conftest import FLOOR, assert_matches, err, randomize_bn

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False")]


def _train_backends():
    names = ["torch"]
    if HAS_CUDA:
        for name in ("triton", "cuda"):
            probe = torch.empty(1, 8, 4, 4, device="cuda", dtype=torch.float16)
            if backends.supports_train(name, probe, probe.new_empty(8, 8, 1, 1), 1)[0]:
                names.append(name)
    return names


SHAPES = {  # name: (C, K, H, R, stride) at batch 4
    "stem_7x7_s2_c3": (3, 64, 56, 7, 2),
    "l1_3x3": (64, 64, 28, 3, 1),
    "l1_1x1_expand": (64, 256, 28, 1, 1),
    "l2_3x3_s2": (128, 128, 28, 3, 2),
    "l3_3x3": (256, 256, 14, 3, 1),
    "l4_1x1_k_not_8": (512, 100, 7, 1, 1),
}


def _oracle(x, w, g, b, r, stride, padding):
    y = F.conv2d(x, w, None, stride, padding)
    y = F.batch_norm(y, None, None, g, b, True, 0.0, 1e-5)
    return (y + r).relu()


@pytest.mark.parametrize("backend", _train_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_training_backends_vs_float64(backend, dtype, shape):
    c, k, h, r, stride = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    pad = r // 2
    x64 = torch.randn(4, c, h, h, generator=gen, dtype=torch.float64)
    w64 = torch.randn(k, c, r, r, generator=gen, dtype=torch.float64) / (c * r * r) ** 0.5
    g64 = torch.rand(k, generator=gen, dtype=torch.float64) * 2 - 0.5
    b64 = torch.randn(k, generator=gen, dtype=torch.float64) * 0.2
    p = (h + 2 * pad - r) // stride + 1
    r64 = torch.randn(4, k, p, p, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x64, w64, g64, b64, r64)]
    ref = _oracle(*leaves, stride, pad)
    gout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref.backward(gout)

    def run(fn):
        xs, ws, rs = (t.to("cuda", dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
                      for t in (x64, w64, r64))
        gs, bs = (t.to("cuda", torch.float32).requires_grad_() for t in (g64, b64))
        out = fn(xs, ws, gs, bs, rs)
        out.backward(gout.to("cuda", dtype).contiguous(memory_format=torch.channels_last))
        return [t.detach().float().cpu() for t in (out, xs.grad, ws.grad, gs.grad, bs.grad, rs.grad)]

    ours = run(lambda xs, ws, gs, bs, rs: rk.fused_conv_bn_train(xs, ws, gs, bs, rs, stride=stride, padding=pad,
                                                                 backend=backend))
    unfused = run(lambda xs, ws, gs, bs, rs: (F.batch_norm(F.conv2d(xs, ws, None, stride, pad), None, None, gs, bs,
                                                           True, 0.0, 1e-5) + rs).relu())
    pre = (F.batch_norm(F.conv2d(x64, w64, None, stride, pad), None, None, g64, b64, True, 0.0, 1e-5) + r64)
    clear = pre.abs() > 4 * FLOOR[dtype] * pre.abs().max()  # ReLU masks may flip within rounding of 0
    for name, a, u, want in zip(("out", "dx", "dw", "dgamma", "dbeta", "dres"), ours, unfused,
                                [ref] + [t.grad for t in leaves]):
        if name == "dres":
            a, u, want = a * clear, u * clear, want * clear
        assert_matches(a, want.detach(), u, dtype=dtype), (backend, name)


def _bn_block():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32, momentum=None),
                         nn.ReLU())


@pytest.mark.parametrize("backend", _train_backends())
def test_E4b_reduce_overhead_training_updates_stats_once_per_call(backend):
    ref = _bn_block().cuda().train()
    fused = rk.convert(copy.deepcopy(ref), backend=backend).cuda().train()
    step = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for i in range(3):  # warm-up, record, replay
        x = torch.randn(8, 16, 12, 12, device="cuda", generator=gen)
        with torch.no_grad():
            y_ref = ref(x)
            y = step(x).clone()
        assert err(y, y_ref) < 1e-3, i
    for (n, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=n)
        else:
            assert int(a) == int(b) == 3, (n, int(a), int(b))


@pytest.mark.parametrize("backend", _train_backends())
def test_E4c_manual_graph_of_training_forward(backend):
    ref = _bn_block().cuda().train()
    fused = rk.convert(copy.deepcopy(ref), backend=backend).cuda().train()
    static_x = torch.randn(8, 16, 12, 12, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        fused(static_x)  # warm-up (one statistics update), mirrored on ref below
    torch.cuda.current_stream().wait_stream(s)
    with torch.no_grad():
        ref(static_x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = fused(static_x)  # recorded, not run: no statistics update here
    for i in range(3):  # each replay is one step, statistics update included
        static_x.copy_(torch.randn(8, 16, 12, 12, device="cuda"))
        graph.replay()
        with torch.no_grad():
            y_ref = ref(static_x)
        assert err(static_y, y_ref) < 1e-3, i
    for (n, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=n)
        else:
            assert int(a) == int(b), (n, int(a), int(b))


def test_amp_resnet18_training_step_next_to_torchvision():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).cuda().train().to(memory_format=torch.channels_last)
    fused = rk.convert(copy.deepcopy(ref)).train()
    x = torch.randn(16, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.arange(16, device="cuda") % 10
    ref64 = copy.deepcopy(ref).double()
    loss64 = F.cross_entropy(ref64(x.double()), labels)
    losses = {}
    for name, m in (("ref", ref), ("fused", fused)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses[name] = F.cross_entropy(m(x), labels).float()
        losses[name].backward()
    d_ref = abs(losses["ref"].item() - loss64.item())
    d_fused = abs(losses["fused"].item() - loss64.item())
    assert d_fused <= max(3 * d_ref, 3e-2 * abs(loss64.item())), (losses, loss64.item())
    for (n, p1), (_, p2) in zip(ref.named_parameters(), fused.named_parameters()):
        assert p2.grad is not None and torch.isfinite(p2.grad).all(), n


_CUDA_TRAIN = HAS_CUDA and "cuda" in _train_backends()


@pytest.mark.skipif(not _CUDA_TRAIN, reason="the cuda backend cannot run training here (not built with CUDA, "
                    "or the GPU is older than sm_80)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["m_tail_k_tail", "stem_c3", "large_mean", "one_tile"])
def test_cuda_statistics_epilogue_vs_float64(dtype, case):
    """conv_bn_stats_cuda: raw y equals the convolution, and Chan's combine of its per-tile
    partials gives the float64 batch mean / biased variance of the stored y, for M and K tails (rows past M and
    channels past K must not count), the scalar-load C=3 kernel, a channel mean 1e3x its spread
    (where E[y^2] - E[y]^2 in fp32 would lose every digit) and a single M tile."""
    from resnet_kernels._stats import chan_combine
    n, c, k, h, r, s, offset = {"m_tail_k_tail": (3, 64, 72, 13, 3, 1, 0.0), "stem_c3": (2, 3, 64, 30, 7, 2, 0.0),
                                "large_mean": (4, 32, 64, 16, 1, 1, 1e3), "one_tile": (1, 16, 24, 5, 3, 1, 0.0)}[case]
    gen = torch.Generator().manual_seed(1)
    x64 = torch.randn(n, c, h, h, generator=gen, dtype=torch.float64)
    w64 = torch.randn(k, c, r, r, generator=gen, dtype=torch.float64) / (c * r * r) ** 0.5
    if offset:
        x64 = x64 * 1e-3 + 1.0  # every input ~1: the conv output is ~sum(w) per channel, spread ~1e-3
        w64 = w64.abs() * offset / (c * r * r) ** 0.5
    x, w = (t.to("cuda", dtype).contiguous(memory_format=torch.channels_last) for t in (x64, w64))
    y, psum, pm2, pcnt = torch.ops.resnet_kernels.conv_bn_stats_cuda(x, w, [s, s], [r // 2, r // 2], [1, 1], 1)
    ref_y = F.conv2d(x.double(), w.double(), None, s, r // 2)  # the rounded inputs, exact arithmetic
    assert_matches(y, ref_y, F.conv2d(x, w, None, s, r // 2), dtype=dtype)
    M = ref_y.numel() // k
    assert pcnt.sum().item() == M, (pcnt, M)
    mean, var = chan_combine(psum, pm2, pcnt, M)
    # the statistics are those of y as stored (rounded to dtype), like BatchNorm on eager's conv output
    ref_var, ref_mean = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    tol = 1e-3 if offset else 1e-4  # fp32 summation order only (tile sums, Chan's combine)
    assert (mean.double().cpu() - ref_mean.cpu()).abs().max() <= tol * ref_mean.abs().max().cpu() + 1e-6
    assert ((var.double().cpu() - ref_var.cpu()).abs() <= tol * ref_var.cpu() + 1e-6).all(), (var, ref_var)
