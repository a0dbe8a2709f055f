"""FusedConvBNAct / FusedBasicBlock / FusedBottleneck against float64 torchvision blocks."""
import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

import resnet_kernels as rk
from conftest import assert_matches, err, randomize_bn, triton_available


def basic(inplanes=16, planes=16, stride=1, downsample=None, **kw):
    if downsample is True:
        downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
    return BasicBlock(inplanes, planes, stride, downsample, **kw)


def bottleneck(inplanes=32, planes=8, stride=1, downsample=None, groups=1, base_width=64, dilation=1):
    if downsample is True:
        downsample = nn.Sequential(conv1x1(inplanes, planes * 4, stride), nn.BatchNorm2d(planes * 4))
    return Bottleneck(inplanes, planes, stride, downsample, groups, base_width, dilation)


BLOCKS = {
    "basic": lambda: basic(),
    "basic_down_s2": lambda: basic(16, 32, 2, True),
    "bottleneck": lambda: bottleneck(),
    "bottleneck_down_s2": lambda: bottleneck(16, 8, 2, True),
    "resnext_groups4": lambda: bottleneck(64, 16, 1, None, groups=4, base_width=8),
    "bottleneck_dilated": lambda: bottleneck(32, 8, 1, None, dilation=2),
}
SIZES = {"odd": (2, 9, 11), "batch1": (1, 8, 8), "tiny": (2, 1, 1), "s2_odd": (2, 7, 5)}


def run_block(name, size, dtype, channels_last, seed=0):
    torch.manual_seed(seed)
    block = randomize_bn(BLOCKS[name](), seed).eval()
    n, h, w = size
    x = torch.randn(n, block.conv1.in_channels, h, w)
    ref64 = copy.deepcopy(block).double()(x.double())
    fused = rk.convert(block)
    assert isinstance(fused, (rk.FusedBasicBlock, rk.FusedBottleneck))
    xd = x.to(dtype)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = fused.to(dtype)(xd)
        unfused = block.to(dtype)(xd)
    return y, unfused, ref64, xd


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("size", list(SIZES), ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_matches_float64_torchvision(name, size, channels_last, dtype):
    y, unfused, ref64, xd = run_block(name, SIZES[size], dtype, channels_last)
    assert y.shape == ref64.shape and y.dtype == dtype
    assert_matches(y, ref64, unfused, dtype)
    # the output follows the input's memory format
    fmt = torch.channels_last if rk.backends.is_channels_last(xd) else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("name", ["basic_down_s2", "bottleneck"])
def test_block_fp16_cpu(name):
    y, unfused, ref64, _ = run_block(name, (2, 8, 8), torch.float16, True)
    assert_matches(y, ref64, unfused, torch.float16)


@pytest.mark.skipif(not triton_available(), reason="Triton cannot launch here (no GPU, TRITON_INTERPRET unset)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_block_triton_backend(dtype):
    torch.manual_seed(0)
    block = randomize_bn(basic(8, 16, 2, True)).eval()
    x = torch.randn(1, 8, 9, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    ref64 = copy.deepcopy(block).double()(x.double())
    fused = rk.convert(block, backend="triton").to(dtype)
    with torch.no_grad():
        y = fused(x)
        unfused = block.to(dtype)(x)
    assert_matches(y, ref64, unfused, dtype)


def test_state_dict_round_trip_and_repr():
    block = randomize_bn(basic(16, 32, 2, True)).eval()
    fused = rk.convert(block)
    sd = block.state_dict()
    assert list(fused.state_dict()) == list(sd)
    fused.load_state_dict(sd, strict=True)
    block2 = basic(16, 32, 2, True)
    block2.load_state_dict(fused.state_dict(), strict=True)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in block.named_parameters()]
    text = repr(fused)
    assert "FusedBasicBlock" in text and "conv2+bn2+add+relu" in text and "FusedConvBNAct" in text


def test_from_modules_standalone():
    conv, bn = nn.Conv2d(8, 16, 3, padding=1, bias=True), nn.BatchNorm2d(16)
    randomize_bn(bn)
    m = rk.FusedConvBNAct.from_modules(conv, bn, nn.ReLU()).eval()
    x = torch.randn(2, 8, 6, 6)
    ref = torch.relu(bn.double()(conv.double()(x.double())))
    m.float()
    assert_matches(m(x), ref, dtype=torch.float32)
    assert set(m.state_dict()) >= {"conv.weight", "conv.bias", "bn.weight", "bn.running_var"}
    res = torch.randn(2, 16, 6, 6)
    ref2 = torch.relu(bn.double()(conv.double()(x.double())) + res.double())
    m.float()
    assert_matches(m(x, res), ref2, dtype=torch.float32)
    with pytest.raises(ValueError, match="act must be"):
        rk.FusedConvBNAct.from_modules(conv, bn, nn.SiLU())
    with pytest.raises(ValueError, match="not BatchNorm2d"):
        rk.FusedConvBNAct.from_modules(conv, nn.GroupNorm(4, 16))


def test_from_block_rejects_what_it_cannot_fuse():
    block = basic(norm_layer=lambda c: nn.GroupNorm(4, c))
    with pytest.raises(ValueError, match="GroupNorm"):
        rk.FusedBasicBlock.from_block(block)
    with pytest.raises(ValueError, match="expected a torchvision Bottleneck"):
        rk.FusedBottleneck.from_block(basic())


def test_folded_constants_follow_weight_and_stat_changes():
    """Caches are never stale: in-place updates, load_state_dict, eval -> train -> eval."""
    torch.manual_seed(0)
    block = randomize_bn(basic(8, 8)).eval()
    fused = rk.convert(block)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        fused(x)
        fused.bn1.running_var.mul_(4.0)       # in-place stat change
        fused.conv2.weight.mul_(-0.5)         # in-place weight change
        block.bn1.running_var.mul_(4.0)
        block.conv2.weight.mul_(-0.5)
        assert err(fused(x), block.double()(x.double())) < 1e-5
        block.float()
    # a training step changes running stats; eval afterwards must use the new ones
    fused.train(), block.train()
    xt = torch.randn(4, 8, 6, 6)
    assert err(fused(xt), block(xt)) < 1e-5
    for a, b in zip(fused.buffers(), block.buffers()):
        if a.is_floating_point():  # the same statistics reduced in another order: last-bit differences
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a, b)  # num_batches_tracked
    fused.eval(), block.eval()
    with torch.no_grad():
        assert err(fused(x), block.double()(x.double())) < 1e-5
    block.float()
    sd = randomize_bn(copy.deepcopy(block), seed=3).state_dict()
    fused.load_state_dict(sd)
    block.load_state_dict(sd)
    with torch.no_grad():
        assert err(fused(x), block.double()(x.double())) < 1e-5


def test_train_mode_matches_torchvision():
    torch.manual_seed(0)
    block = basic(8, 16, 2, True).train()
    fused = rk.convert(block)
    x = torch.randn(4, 8, 10, 10, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y1, y2 = block(x), fused(x2)
    assert torch.allclose(y1, y2, atol=1e-6)
    y1.square().sum().backward()
    y2.square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    for (n1, p1), (n2, p2) in zip(block.named_parameters(), fused.named_parameters()):
        assert n1 == n2 and torch.allclose(p1.grad, p2.grad, atol=1e-4), n1
    for (n1, b1), (n2, b2) in zip(block.named_buffers(), fused.named_buffers()):
        assert n1 == n2 and torch.allclose(b1, b2), n1


def test_eval_gradients_match_unfused():
    """Fine-tuning a converted model in eval mode (frozen BN statistics) gives PyTorch's gradients."""
    torch.manual_seed(0)
    block = randomize_bn(basic(8, 16, 2, True)).eval().double()
    fused = rk.convert(block)
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    block(x).sin().sum().backward()
    fused(x2).sin().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-10)
    for (n1, p1), (_, p2) in zip(block.named_parameters(), fused.named_parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-10), n1
