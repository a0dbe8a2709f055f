"""Field cases (shared/cases/FIELD_CASES.md) on every backend available here, by name and through auto.

tests/test_field_cases.py runs the cases through `auto` (the torch backend on CPU); the GPU halves
live in tests/test_gpu_kernels.py / test_gpu_train.py. Here, the CPU / Triton-interpreter halves of
the cases whose kind is "a backend mishandles a class of inputs":
- C4 capability and layout gating: NCHW input to the NHWC-native kernels, C=3 and C=20 (not
  multiples of 8), fp32/fp16/bf16; every backend name: it serves the call correctly or raises
  BackendUnavailable naming the rule; auto is always right; a converted model fed NCHW works.
- A2 extreme BN constants (var 1e5 > fp16 max, 1e-7, gamma 1e3 with var 1e-6) on each backend.
- B4 gamma=0 gives relu(shortcut) exactly, negative gamma is right, on each backend.
- C1 stride-2 blocks at odd sizes (1x1, 7x7, 15x15, 33x17) on each backend.
- E4 (CUDA graphs) has no CPU half: tests/test_gpu_kernels.py::test_E4* skip here with the reason.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, conv1x1

import resnet_kernels as rk
from resnet_kernels import backends
from conftest import FLOOR, assert_matches, err, randomize_bn

ALL = ("auto", "torch", "triton", "cuda")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _oracle(x, w, scale, shift, res, stride, padding, relu=True):
    y = F.conv2d(x.double(), w.double(), None, stride, padding)
    y = y * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if res is not None:
        y = y + res.double()
    return y.relu() if relu else y


def _unfused(x, w, scale, shift, res, stride, padding, relu=True):
    y = F.conv2d(x, w, None, stride, padding)
    y = y * scale.to(y.dtype).view(1, -1, 1, 1) + shift.to(y.dtype).view(1, -1, 1, 1)
    if res is not None:
        y = y + res
    return y.relu() if relu else y


def _serves(name, x, w, groups=1):
    """(True, "") when `name` can serve this call here, else (False, the rule)."""
    if name == "auto":
        return True, ""
    return backends.supports(name, x, w, groups)


# --- C4: capability and layout gating (CPU half) -------------------------------------------------------
C4_CASES = {  # c: (k, h, w, r, stride, padding, residual kind)
    3: (24, 33, 31, 7, 2, 3, "nchw"),        # the stem: C=3, 7x7 s2
    20: (20, 17, 19, 3, 1, 1, "transposed"),  # C=K=20, a strided residual view
}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("c", sorted(C4_CASES))
def test_C4_nchw_input_odd_channels_every_backend(c, dtype, backend):
    k, h, w_, r, stride, pad, res_kind = C4_CASES[c]
    g = torch.Generator().manual_seed(c)
    x = torch.randn(2, c, h, w_, generator=g).to(dtype)  # NCHW, as a user passes it
    w = (torch.randn(k, c, r, r, generator=g) / (c * r * r) ** 0.5).to(dtype)
    scale, shift = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g) * 0.3
    p = (h + 2 * pad - r) // stride + 1
    q = (w_ + 2 * pad - r) // stride + 1
    res = torch.randn(2, k, p, q, generator=g).to(dtype)
    if res_kind == "transposed":
        res = res.transpose(2, 3).contiguous().transpose(2, 3)
    ok, why = _serves(backend, x, w)
    call = lambda: rk.fused_conv_bn_act(x, w, scale, shift, res, stride=stride, padding=pad,  # noqa: E731
                                        backend=backend)
    if not ok:
        assert why, "a refusal names its rule"
        with pytest.raises(rk.BackendUnavailable) as info:
            call()
        assert str(info.value) == why and backend in str(info.value)
        return
    with torch.no_grad():
        y = call()
    assert y.dtype == dtype and y.is_contiguous(), "NCHW in, NCHW out"
    assert_matches(y, _oracle(x, w, scale, shift, res, stride, pad), _unfused(x, w, scale, shift, res, stride, pad),
                   dtype)


class _TinyNet(nn.Module):
    """A C=3 stem, a K=20 / C=20 pair with a residual, a stride-2 1x1: the C4 model, CPU sized."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 7, 2, 3, bias=False), nn.BatchNorm2d(24)
        self.conv2, self.bn2 = nn.Conv2d(24, 20, 3, 1, 1, bias=False), nn.BatchNorm2d(20)
        self.conv3, self.bn3 = nn.Conv2d(20, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24)
        self.conv4, self.bn4 = nn.Conv2d(24, 16, 1, 2, 0, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(y)) + x)
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_C4_model_fed_nchw_mid_stream(dtype, backend):
    """A converted model given NCHW input (channels_last=False: no layout hook) runs on the backend
    through every layer, no raw backend error mid-model, logits within the rule."""
    torch.manual_seed(0)
    model = randomize_bn(_TinyNet(), gamma=(0.5, 1.0)).eval()
    x = torch.randn(2, 3, 24, 22)
    if backend != "auto" and not _serves(backend, x.to(dtype), torch.empty(1, 3, 1, 1, dtype=dtype))[0]:
        pytest.skip(f"{backend} cannot run here: {backends.status()[backend][1]}")
    fast = rk.convert(copy.deepcopy(model), backend=backend, channels_last=False).to(dtype)
    assert any(not r[1].startswith("skipped") for r in rk.summary(fast))
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        y = fast(x.to(dtype))
        eager = copy.deepcopy(model).to(dtype)(x.to(dtype))
    assert y.dtype == dtype
    assert_matches(y, ref64, eager, dtype)


# --- A2 on each backend ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["model_half", "amp_style"])
def test_A2_extreme_bn_constants_every_backend(mode, backend):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    randomize_bn(m[1], gamma=(0.5, 1.5))
    with torch.no_grad():
        m[1].running_var[0] = 1e5            # > fp16 max: inf once the buffers are fp16
        m[1].running_var[1] = 1e-7           # an fp16 subnormal
        m[1].weight[2], m[1].running_var[2] = 1e3, 1e-6  # scale ~1e6: folded fp16 weights would overflow
        m[1].running_mean[2] = m[1].bias[2] = 0.0
        m[0].weight[2] *= 1e-3
    m.eval()
    x = torch.randn(2, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    m16 = copy.deepcopy(m).half() if mode == "model_half" else copy.deepcopy(m)
    if mode == "amp_style":
        m16[0].half()
    if not _serves(backend, x.half(), m16[0].weight)[0]:
        pytest.skip(f"{backend} cannot run here: {backends.status()[backend][1]}")
    ref64 = copy.deepcopy(m16).double()(x.double())
    fast = rk.convert(m16, backend=backend)
    with torch.no_grad():
        y = fast(x.half())
    assert torch.isfinite(y).all() and torch.isfinite(ref64).all()
    assert err(y, ref64) <= FLOOR[F16]
    for ch in (0, 1, 2):
        assert err(y[:, ch], ref64[:, ch]) <= 1e-2, ch


# --- B4 on each backend ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_B4_zero_and_negative_gamma_every_backend(backend, channels_last):
    x = torch.randn(2, 8, 7, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if not _serves(backend, x, torch.empty(8, 8, 3, 3))[0]:
        pytest.skip(f"{backend} cannot run here: {backends.status()[backend][1]}")
    torch.manual_seed(0)
    block = randomize_bn(BasicBlock(8, 8)).eval()
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
        fused = rk.FusedBasicBlock.from_block(copy.deepcopy(block), backend=backend)
        assert torch.equal(fused(x), torch.relu(x)), "gamma=0: exactly relu(shortcut)"
        randomize_bn(block, gamma=(-2.0, -0.5))
        fused = rk.FusedBasicBlock.from_block(copy.deepcopy(block), backend=backend)
        assert_matches(fused(x), copy.deepcopy(block).double()(x.double()), block(x), F32)


# --- C1 on each backend ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("hw", [(1, 1), (7, 7), (15, 15), (33, 17)], ids=str)
def test_C1_stride2_odd_sizes_every_backend(hw, backend):
    x = torch.randn(1, 8, *hw)
    if not _serves(backend, x, torch.empty(16, 8, 3, 3))[0]:
        pytest.skip(f"{backend} cannot run here: {backends.status()[backend][1]}")
    torch.manual_seed(0)
    block = randomize_bn(BasicBlock(8, 16, 2, nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16)))).eval()
    fast = rk.convert(copy.deepcopy(block), backend=backend)
    with torch.no_grad():
        y = fast(x)
        ref64 = copy.deepcopy(block).double()(x.double())
        assert y.shape == ref64.shape
        assert_matches(y, ref64, block(x), F32)
