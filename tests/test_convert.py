"""convert() and summary() on whole torchvision models, run on a real photo."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torchvision

import resnet_kernels as rk
from conftest import assert_matches, randomize_bn, real_photo

MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d"]


def build(name, **kw):
    torch.manual_seed(0)
    return randomize_bn(getattr(torchvision.models, name)(**kw), seed=1, gamma=(-0.5, 1.0)).eval()


def count_blocks(model):
    from torchvision.models.resnet import BasicBlock, Bottleneck
    return sum(isinstance(m, (BasicBlock, Bottleneck)) for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_converted_model_matches_float64_on_a_photo(name):
    model = build(name)
    x = real_photo(64)
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        unfused = model(x)
        fast = rk.convert(model)
        y = fast(x)
    assert_matches(y, ref64, unfused, torch.float32)
    assert y.argmax() == ref64.argmax()
    rows = rk.summary(fast)
    fused_blocks = [r for r in rows if r[1].startswith("Fused")]
    assert len(fused_blocks) == count_blocks(model)
    assert ("conv1", "conv+bn+relu") in rows  # the stem
    assert not [r for r in rows if r[1].startswith("skipped")], rows
    n_down = sum(1 for n, _ in model.named_modules() if n.endswith("downsample"))
    assert sum(1 for n, k in rows if n.endswith("downsample.0") and k == "conv+bn") == n_down
    assert type(model.layer1[0]).__name__ in ("BasicBlock", "Bottleneck"), "inplace=False must not touch the input"


def test_state_dict_round_trip_resnet50():
    model = build("resnet50")
    fast = rk.convert(model)
    sd = model.state_dict()
    assert list(fast.state_dict().keys()) == list(sd.keys())
    fast.load_state_dict(sd, strict=True)
    fresh = torchvision.models.resnet50()
    fresh.load_state_dict(fast.state_dict(), strict=True)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in fast.named_buffers()] == [n for n, _ in model.named_buffers()]


def test_convert_twice_changes_nothing():
    model = build("resnet18")
    once = rk.convert(model)
    twice = rk.convert(once)
    assert repr(once) == repr(twice)
    assert rk.summary(once) == rk.summary(twice)
    x = real_photo(32)
    with torch.no_grad():
        assert torch.equal(once(x), twice(x))
    same = rk.convert(once, inplace=True)
    assert same is once


def test_shared_conv_is_not_folded():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.bn2, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(x))) + self.bn2(self.conv(x))

    m = randomize_bn(Twice()).eval()
    fast = rk.convert(m)
    assert type(fast.conv) is nn.Conv2d and type(fast.bn) is nn.BatchNorm2d
    assert any("more than once" in r[1] or "only user" in r[1] for r in rk.summary(fast))
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        assert torch.allclose(fast(x), m(x))

    # the same conv registered in two places is not folded either
    conv = nn.Conv2d(4, 4, 3, padding=1)
    seq = randomize_bn(nn.Sequential(nn.Sequential(conv, nn.BatchNorm2d(4)), nn.Sequential(conv, nn.BatchNorm2d(4)))).eval()
    fast = rk.convert(seq)
    assert type(fast[0][0]) is nn.Conv2d
    assert any("registered more than once" in r[1] for r in rk.summary(fast))


def test_relu_used_twice_is_not_absorbed():
    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()

        def forward(self, x):
            return self.relu(self.relu(self.bn(self.conv(x))) - 0.5)

    m = randomize_bn(Stem()).eval()
    fast = rk.convert(m)
    assert isinstance(fast.conv, rk.FusedConvBNAct) and not fast.conv.relu and isinstance(fast.relu, nn.ReLU)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fast(x), m(x), atol=1e-6)


def test_filter_excludes_subtrees():
    model = build("resnet18")
    fast = rk.convert(model, filter=lambda m, name: not name.startswith("layer4"))
    assert type(fast.layer4[0]).__name__ == "BasicBlock" and isinstance(fast.layer1[0], rk.FusedBasicBlock)


def test_bare_block_and_backend_argument():
    from torchvision.models.resnet import BasicBlock
    fused = rk.convert(BasicBlock(8, 8), backend="torch")
    assert isinstance(fused, rk.FusedBasicBlock) and fused.backend == "torch"
    with pytest.raises(ValueError, match="backend"):
        rk.convert(BasicBlock(8, 8), backend="tensorrt")
    with pytest.raises(TypeError, match="nn.Module"):
        rk.convert("resnet18")


def test_untraceable_parent_is_reported_not_fatal():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.bn(self.conv(x))
            return self.bn(self.conv(-x))

    m = Dynamic().eval()
    fast = rk.convert(m)
    assert any("could not be traced" in r[1] for r in rk.summary(fast))
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(fast(x), m(x))


def test_other_architecture_mobilenet():
    """Generic conv->BN(->act) chains outside ResNets: depthwise convs, Hardswish left in place."""
    torch.manual_seed(0)
    m = randomize_bn(torchvision.models.mobilenet_v3_small(), gamma=(0.5, 1.0)).eval()
    x = real_photo(64)
    with torch.no_grad():
        ref64 = copy.deepcopy(m).double()(x.double())
        fast = rk.convert(m)
        assert_matches(fast(x), ref64, m(x), torch.float32)
    assert sum(k.startswith("conv+bn") for _, k in rk.summary(fast)) > 20


def test_channels_last_hook_and_formats():
    model = build("resnet18")
    fast = rk.convert(model)
    feats = {}
    fast.layer1.register_forward_hook(lambda m, i, o: feats.setdefault("l1", o))
    with torch.no_grad():
        fast(real_photo(32))
    assert feats["l1"].is_contiguous(memory_format=torch.channels_last)
    plain = rk.convert(model, channels_last=False)
    feats.clear()
    plain.layer1.register_forward_hook(lambda m, i, o: feats.setdefault("l1", o))
    with torch.no_grad():
        plain(real_photo(32))
    assert feats["l1"].is_contiguous()


def test_compile_fullgraph_converted_block():
    from torchvision.models.resnet import Bottleneck
    block = randomize_bn(Bottleneck(32, 8)).eval()
    fused = rk.convert(block)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        ref64 = copy.deepcopy(block).double()(x.double())
        assert_matches(compiled(x), ref64, block(x), torch.float32)


def test_info_cli_and_available_backends():
    assert "torch" in rk.available_backends()
    out = subprocess.run([sys.executable, "-m", "resnet_kernels", "info"], capture_output=True, text=True, check=True).stdout
    for word in ("torch", "triton", "cuda", "extension", "device"):
        assert word in out


class _ClampReLU(nn.ReLU):
    """A ReLU subclass computing something else: must never be fused as a ReLU."""
    def forward(self, x):
        return x.clamp(0, 0.5)


def test_relu_subclass_is_not_fused_as_relu():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), _ClampReLU()).eval()
    randomize_bn(m)
    x = torch.randn(2, 8, 9, 9)
    c = rk.convert(m)
    torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-5)
    assert dict(rk.summary(c))["0"] == "conv+bn"  # the subclass stays a module of its own
    blk = randomize_bn(torchvision.models.resnet.BasicBlock(16, 16)).eval()
    blk.relu = _ClampReLU()
    assert not isinstance(rk.convert(blk), rk.FusedBasicBlock)
    with pytest.raises(ValueError, match="not a subclass"):
        rk.FusedConvBNAct.from_modules(m[0], m[1], _ClampReLU())


def test_modules_with_hooks_are_left_alone_and_reported():
    """A fused op never calls the modules it replaces: a conv, BN, ReLU or block with hooks is skipped
    (hooks keep running where they did), and summary says why."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    r = randomize_bn(torchvision.models.resnet18()).eval()
    seen = []
    r.layer1[0].register_forward_hook(lambda *a: seen.append("block"))
    r.layer2[0].bn2.register_forward_hook(lambda *a: seen.append("bn2"))
    r.layer3[0].conv1.register_forward_pre_hook(lambda *a: seen.append("conv1"))
    r.layer4[0].relu.register_forward_hook(lambda *a: seen.append("relu"))
    ref = r(x)
    want = list(seen)
    seen.clear()
    c = rk.convert(r)
    torch.testing.assert_close(c(x), ref, rtol=1e-4, atol=1e-4)
    assert seen == want
    rows = dict(rk.summary(c))
    for name in ("layer1.0", "layer2.0", "layer3.0", "layer4.0"):
        assert "hooks (fusing would skip them)" in rows[name], (name, rows[name])
    assert rows["layer1.1"].startswith("FusedBasicBlock")


def test_relu_argument_must_be_a_bool():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    with pytest.raises(TypeError, match="relu must be a bool"):
        rk.fused_conv_bn_act(x, w, torch.ones(4), torch.zeros(4), relu="yes")
