"""GPU halves of field cases not covered by tests/test_gpu_kernels.py (skipped here with the reason;
run by scripts/device_check.sh's fuzz step):
- A2 extreme BN constants in fp16 (var 1e5 > fp16 max, 1e-7, gamma 1e3 with var 1e-6) on cuda/triton;
- B4 gamma=0 gives relu(shortcut) exactly, negative gamma is right, on cuda/triton;
- D3 fp32 Triton on the GPU is IEEE unless torch's TF32 flags say otherwise (ERR <= 1e-5), and agrees
  with the Triton interpreter on the CPU (a subprocess with TRITON_INTERPRET=1) within 1e-5.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

import resnet_kernels as rk
from resnet_kernels import backends
from conftest import FLOOR, assert_matches, err, randomize_bn

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False")]


def _gpu_backends(dtype):
    if not HAS_CUDA:
        return []
    probe = torch.empty(1, 8, 4, 4, device="cuda", dtype=dtype)
    return [b for b in ("cuda", "triton") if backends.supports(b, probe, probe.new_empty(8, 8, 3, 3), 1)[0]]


def _params(dtype):
    names = _gpu_backends(dtype)
    return names or [pytest.param("none", marks=pytest.mark.skip(reason="no GPU backend can serve this dtype here"))]


@pytest.mark.parametrize("backend", _params(torch.float16))
@pytest.mark.parametrize("mode", ["model_half", "amp_style"])
def test_A2_extreme_bn_constants_gpu(mode, backend):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
    randomize_bn(m[1], gamma=(0.5, 1.5))
    with torch.no_grad():
        m[1].running_var[0] = 1e5
        m[1].running_var[1] = 1e-7
        m[1].weight[2], m[1].running_var[2] = 1e3, 1e-6
        m[1].running_mean[2] = m[1].bias[2] = 0.0
        m[0].weight[2] *= 1e-3
    m.eval()
    x = torch.randn(4, 64, 32, 32)
    m16 = copy.deepcopy(m).half() if mode == "model_half" else copy.deepcopy(m)
    if mode == "amp_style":
        m16[0].half()
    ref64 = copy.deepcopy(m16).double()(x.double())
    fast = rk.convert(copy.deepcopy(m16), backend=backend).cuda()
    with torch.no_grad():
        y = fast(x.half().cuda().contiguous(memory_format=torch.channels_last)).cpu()
    assert torch.isfinite(y).all(), "no inf/NaN where the float64 reference is finite"
    assert err(y, ref64) <= FLOOR[torch.float16]
    for ch in (0, 1, 2):
        assert err(y[:, ch], ref64[:, ch]) <= 1e-2, ch


@pytest.mark.parametrize("backend", _params(torch.float16))
def test_B4_zero_and_negative_gamma_gpu(backend):
    torch.manual_seed(0)
    block = randomize_bn(BasicBlock(64, 64)).eval()
    x = torch.randn(2, 64, 14, 14).half().cuda().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
        fused = rk.FusedBasicBlock.from_block(copy.deepcopy(block), backend=backend).half().cuda()
        assert torch.equal(fused(x), torch.relu(x)), "gamma=0: exactly relu(shortcut)"
        randomize_bn(block, gamma=(-2.0, -0.5))
        fused = rk.FusedBasicBlock.from_block(copy.deepcopy(block), backend=backend).half().cuda()
        ref64 = copy.deepcopy(block).double()(x.double().cpu())
        eager = copy.deepcopy(block).half().cuda()(x)
        assert_matches(fused(x), ref64, eager, torch.float16)


_D3_SCRIPT = r"""
import os, sys, torch
os.environ["TRITON_INTERPRET"] = "1"
from resnet_kernels.triton import conv_bn_act as tk
d = torch.load(sys.argv[1])
y = tk.conv_bn_act(d["x"], d["w"], d["s"], d["b"], d["r"], (1, 1), (1, 1), (1, 1), True)
torch.save(y, sys.argv[2])
"""


@pytest.mark.skipif(HAS_CUDA and "triton" not in _gpu_backends(torch.float32),
                    reason="the Triton backend cannot run fp32 on this GPU")
def test_D3_fp32_triton_is_ieee_unless_tf32_is_allowed_and_matches_the_interpreter(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, 14, 14, generator=g)
    w = torch.randn(256, 256, 3, 3, generator=g) / 48
    s, b = torch.randn(256, generator=g), torch.randn(256, generator=g)
    r = torch.randn(4, 256, 14, 14, generator=g)
    ref = torch.relu(F.conv2d(x.double(), w.double(), None, 1, 1) * s.double().view(1, -1, 1, 1)
                     + b.double().view(1, -1, 1, 1) + r.double())
    args = [t.cuda() for t in (x, w, s, b, r)]
    cudnn_flag, matmul_flag = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        y_ieee = rk.fused_conv_bn_act(*args, padding=1, backend="triton").cpu()
        assert err(y_ieee, ref) <= 1e-5, "fp32 without the TF32 opt-in must be IEEE"
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        y_tf32 = rk.fused_conv_bn_act(*args, padding=1, backend="triton").cpu()
        assert err(y_tf32, ref) <= 5e-3, "TF32 when opted in: within TF32's precision"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_flag, matmul_flag
    # the interpreter (CPU, IEEE) on the same inputs, in a fresh process: TRITON_INTERPRET is read at import
    torch.save(dict(x=x, w=w, s=s, b=b, r=r), tmp_path / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, "-c", _D3_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], env=env,
                   check=True, timeout=240, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    y_interp = torch.load(tmp_path / "out.pt")
    assert err(y_interp, ref) <= 1e-5
    assert err(y_ieee, y_interp.double()) <= 1e-5, "GPU (IEEE) and interpreter agree"
