"""Field cases from shared/cases/FIELD_CASES.md that concern inference: A2 B1 B3 B4 C1 C2 D1 D3 E1.

Each is a kind of fault; the tests pin the expected behaviour for the whole kind.
"""
import copy
import functools
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

import resnet_kernels as rk
from conftest import FLOOR, assert_matches, err, randomize_bn, real_photo, triton_available


def conv_bn_relu(c=64, k=64):
    return nn.Sequential(nn.Conv2d(c, k, 3, padding=1, bias=False), nn.BatchNorm2d(k), nn.ReLU())


# --- A2: fp16 overflow / underflow in folded constants ---------------------------------------------
def _a2_stats(m):
    conv, bn = m[0], m[1]
    randomize_bn(bn, gamma=(0.5, 1.5))
    with torch.no_grad():
        bn.running_var[0] = 1e5          # > fp16 max
        bn.running_var[1] = 1e-7         # fp16 subnormal
        bn.weight[2] = 1e3               # gamma 1e3 with var 1e-6: scale ~3e5, folded weights would overflow
        bn.running_var[2] = 1e-6
        bn.running_mean[2] = 0.0
        bn.bias[2] = 0.0
        conv.weight[2] *= 1e-3           # keeps the true output of channel 2 inside fp16's range
    return m


@pytest.mark.parametrize("mode", ["model_half", "amp_style"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_A2_fp16_extreme_bn_constants(mode, channels_last):
    torch.manual_seed(0)
    m = _a2_stats(conv_bn_relu()).eval()
    x = torch.randn(4, 64, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if mode == "model_half":   # BN buffers in fp16 too: 1e5 becomes inf, 1e-7 a subnormal
        m16 = copy.deepcopy(m).half()
    else:                      # fp16 conv and activations, fp32 BN
        m16 = copy.deepcopy(m)
        m16[0].half()
    ref64 = copy.deepcopy(m16).double()(x.double())
    fast = rk.convert(m16)
    with torch.no_grad():
        y = fast(x.half())
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all(), "no inf/NaN where ref64 is finite"
    assert torch.isfinite(ref64).all()
    assert err(y, ref64) <= FLOOR[torch.float16]
    # each extreme channel on its own, relative to its own magnitude
    for ch in (0, 1, 2):
        assert err(y[:, ch], ref64[:, ch]) <= 1e-2, ch


# --- B1: requires_grad after inference conversion ----------------------------------------------------
@pytest.mark.parametrize("frozen", ["all", "layer1_2"])
def test_B1_requires_grad_preserved(frozen):
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    for name, p in model.named_parameters():
        if frozen == "all" or name.startswith(("layer1", "layer2")):
            p.requires_grad_(False)
    fast = rk.convert(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {n: p.requires_grad for n, p in fast.named_parameters()} == flags
    opt_params = [p for p in fast.parameters() if p.requires_grad]
    frozen_ids = {id(p) for n, p in fast.named_parameters() if not flags[n]}
    assert not frozen_ids & {id(p) for p in opt_params}
    x = real_photo(32)
    with torch.inference_mode():
        y_inf = fast(x)
    assert not y_inf.requires_grad
    y = fast(x)
    if frozen == "all":
        assert not y.requires_grad
        return
    assert y.requires_grad
    y.sum().backward()
    model(x).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), fast.named_parameters()):
        if flags[n]:
            assert err(q.grad, p.grad) < 1e-4, n
        else:
            assert q.grad is None, n


# --- B3: timm NormAct layers and BN subclasses --------------------------------------------------------
def test_B3_bn_subclass_is_skipped_with_warning():
    from timm.layers import BatchNormAct2d
    for act in (nn.ReLU, nn.SiLU):
        m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), BatchNormAct2d(16, act_layer=act))
        randomize_bn(m).eval()
        with pytest.warns(UserWarning, match="unknown BatchNorm subclass"):
            fast = rk.convert(m)
        assert type(fast[0]) is nn.Conv2d and type(fast[1]) is BatchNormAct2d
        assert any("BatchNormAct2d" in r[1] for r in rk.summary(fast))
        x = torch.randn(2, 8, 6, 6)
        with torch.no_grad():
            assert torch.equal(fast(x), m(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50d", "resnet26t", "efficientnet_b0"])
def test_B3_timm_models_match_float64(name):
    import timm
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10), gamma=(0.5, 1.0)).eval()
    x = real_photo(64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = rk.convert(model)
    rows = rk.summary(fast)
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        assert_matches(fast(x), ref64, model(x), torch.float32)
    fused = [r for r in rows if not r[1].startswith("skipped")]
    if name == "efficientnet_b0":  # BatchNormAct2d everywhere: nothing fused, everything reported
        assert any("BatchNormAct2d" in r[1] for r in rows)
        act_types = {type(m) for m in fast.modules()}
        assert nn.SiLU in act_types
    else:
        assert len(fused) > 10


# --- B4: zero / negative gamma, no-affine BN, non-BN norms ---------------------------------------------
def test_B4_zero_gamma_block_is_relu_of_shortcut_exactly():
    torch.manual_seed(0)
    for model in (torchvision.models.resnet18(zero_init_residual=True),
                  torchvision.models.resnet50(zero_init_residual=True)):
        model.eval()
        fast = rk.convert(model)
        block, ref_block = fast.layer1[1], model.layer1[1]
        x = torch.randn(2, ref_block.conv1.in_channels, 8, 8)
        with torch.no_grad():
            assert torch.equal(block(x), torch.relu(x))
            assert torch.equal(block(x), ref_block(x))


def test_B4_negative_gamma():
    block = BasicBlock(8, 8).eval()
    randomize_bn(block, gamma=(-2.0, -0.5))
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert_matches(rk.convert(block)(x), copy.deepcopy(block).double()(x.double()), block(x), torch.float32)


@pytest.mark.parametrize("norm", ["bn_no_affine", "group", "instance", "frozen_bn"])
def test_B4_norm_layers(norm):
    from torchvision.ops.misc import FrozenBatchNorm2d
    layer = {"bn_no_affine": functools.partial(nn.BatchNorm2d, affine=False),
             "group": lambda c: nn.GroupNorm(4, c),
             "instance": nn.InstanceNorm2d,
             "frozen_bn": FrozenBatchNorm2d}[norm]
    torch.manual_seed(0)
    # torchvision's ResNet constructor cannot init affine-free norms, so build the same layers directly
    model = nn.Sequential(
        nn.Conv2d(3, 16, 7, 2, 3, bias=False), layer(16), nn.ReLU(inplace=True),
        BasicBlock(16, 16, norm_layer=layer),
        BasicBlock(16, 32, 2, nn.Sequential(conv1x1(16, 32, 2), layer(32)), norm_layer=layer),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    fast = rk.convert(model)
    rows = rk.summary(fast)
    x = real_photo(32)
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        assert_matches(fast(x), ref64, model(x), torch.float32)
    if norm == "bn_no_affine":
        assert sum(r[1].startswith("FusedBasicBlock") for r in rows) == 2
        assert ("0", "conv+bn+relu") in rows
    else:
        assert not any(r[1].startswith("Fused") or r[1].startswith("conv+bn") for r in rows)
        assert sum(r[1].startswith("skipped") for r in rows) >= 3


# --- C1: geometry ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_C1_dilated_resnet50():
    model = randomize_bn(torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True],
                                                     num_classes=10), gamma=(0.5, 1.0)).eval()
    x = real_photo(48)
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        assert_matches(rk.convert(model)(x), ref64, model(x), torch.float32)


class DilatedBasicBlock(nn.Module):
    """A user-written block with dilation=2, padding=2 (torchvision's BasicBlock refuses dilation)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


def test_C1_custom_dilated_block():
    m = randomize_bn(DilatedBasicBlock(8)).eval()
    x = torch.randn(2, 8, 11, 9)
    fast = rk.convert(m)
    assert isinstance(fast.conv1, rk.FusedConvBNAct) and fast.conv1.relu
    with torch.no_grad():
        assert_matches(fast(x), copy.deepcopy(m).double()(x.double()), m(x), torch.float32)


@pytest.mark.parametrize("hw", [(1, 1), (7, 7), (15, 15), (57, 57), (225, 225), (33, 17)], ids=str)
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_C1_stride2_odd_sizes(hw, kind):
    torch.manual_seed(0)
    if kind == "basic":
        block = BasicBlock(8, 16, 2, nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16)))
    else:
        block = Bottleneck(8, 4, 2, nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16)))
    randomize_bn(block).eval()
    x = torch.randn(1, 8, *hw)
    fast = rk.convert(block)
    with torch.no_grad():
        y = fast(x)
        ref64 = copy.deepcopy(block).double()(x.double())
    assert y.shape == ref64.shape
    assert_matches(y, ref64, block(x), torch.float32)


def test_C1_timm_avgpool_shortcut():
    import timm
    model = randomize_bn(timm.create_model("resnet50d", pretrained=False, num_classes=10)).eval()
    block = model.layer2[0]  # downsample = AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) -> 1x1 -> BN
    assert isinstance(block.downsample[0], nn.AvgPool2d) and block.downsample[0].ceil_mode
    x = torch.randn(1, 256, 15, 15)  # odd: the last averaging window is partial
    fast = rk.convert(block)
    with torch.no_grad():
        assert_matches(fast(x), copy.deepcopy(block).double()(x.double()), block(x), torch.float32)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(4, 4, 4, padding="same"),
])
def test_C1_unsupported_geometry_left_alone(conv):
    m = randomize_bn(nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU())).eval()
    fast = rk.convert(m)
    assert type(fast[0]) is nn.Conv2d
    assert any("padding" in r[1] for r in rk.summary(fast))
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        assert torch.equal(fast(x), m(x))


def test_C1_asymmetric_padding_fused():
    m = randomize_bn(nn.Sequential(nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2)), nn.BatchNorm2d(6))).eval()
    x = torch.randn(2, 4, 9, 8)
    fast = rk.convert(m)
    assert isinstance(fast[0], rk.FusedConvBNAct)
    with torch.no_grad():
        assert_matches(fast(x), copy.deepcopy(m).double()(x.double()), m(x), torch.float32)


# --- C2: groups x memory format -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["resnext", "depthwise"])
def test_C2_groups_and_memory_formats(dtype, which):
    torch.manual_seed(0)
    if which == "resnext":
        m = Bottleneck(256, 64, groups=32, base_width=4)  # width 128, 32 groups
        c = 256
    else:
        m = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        c = 32
    randomize_bn(m, gamma=(0.5, 1.0)).eval()
    x = torch.randn(2, c, 50, 50)
    ref64 = copy.deepcopy(m).double()(x.double())
    fast = rk.convert(m, channels_last=False).to(dtype)
    m = m.to(dtype)
    outs = {}
    with torch.no_grad():
        for fmt_name, xin in (("nchw", x.to(dtype)), ("cl", x.to(dtype).contiguous(memory_format=torch.channels_last))):
            y = fast(xin)
            outs[fmt_name] = y
            assert_matches(y, ref64, m(xin), dtype)
            want = torch.channels_last if fmt_name == "cl" else torch.contiguous_format
            assert y.is_contiguous(memory_format=want), "the output follows the input's memory format"
        # mixed: channels_last input, weights left contiguous (they are: convert never re-lays weights)
        assert all(p.is_contiguous() for p in fast.parameters())
    assert err(outs["nchw"], outs["cl"].double()) <= FLOOR[dtype]


def test_C2_groups_never_treated_as_one():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
    m = randomize_bn(nn.Sequential(conv, nn.BatchNorm2d(8))).eval()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        y = rk.convert(m)(x)
    assert y.shape == (1, 8, 5, 5) and err(y, copy.deepcopy(m).double()(x.double())) < 1e-5


# --- D1 / D3: Triton configs and IEEE fp32 (interpreter half; the GPU half runs in device_check.sh) ---
triton_only = pytest.mark.skipif(not triton_available(), reason="Triton cannot launch here "
                                 "(no GPU, and TRITON_INTERPRET=1 was not set before import)")


@triton_only
def test_D1_every_config_is_tested_and_correct():
    """The full D1 sweep over every config lives in tests/test_triton_kernel.py; here, the contract
    that the autotuner's candidates are exactly the tested list."""
    from resnet_kernels.triton import conv_bn_act as tk
    assert len(tk.CONFIGS) >= 4
    x = torch.randn(2, 32, 28, 30)
    w = torch.randn(64, 32, 3, 3) / 17
    s, b = torch.randn(64), torch.randn(64)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), None, (2, 3), (4, 5))
    ref = torch.relu(ref * s.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1))
    y = rk.fused_conv_bn_act(x, w, s, b, stride=(2, 3), padding=(4, 5), backend="triton")
    assert err(y, ref) <= 1e-5


@triton_only
def test_D3_fp32_is_ieee_by_default():
    torch.manual_seed(0)
    x = torch.randn(1, 256, 14, 14)
    w = torch.randn(256, 256, 3, 3) / 48
    s, b = torch.randn(256), torch.randn(256)
    res = torch.randn(1, 256, 14, 14)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 1)
    ref = torch.relu(ref * s.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1) + res.double())
    assert not torch.backends.cuda.matmul.allow_tf32
    for backend in ("triton", "torch"):
        y = rk.fused_conv_bn_act(x, w, s, b, res, padding=1, backend=backend)
        assert err(y, ref) <= 1e-5, backend


# --- E1: fake-kernel strides; compile forward + backward with contiguous grads of channels_last outputs ---
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_E1_opcheck_and_strides(channels_last):
    x = torch.randn(2, 8, 7, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, s, b = torch.randn(8, 8, 3, 3) / 9, torch.randn(8), torch.randn(8)
    res = torch.randn(2, 8, 7, 6)
    args = (x, w, s, b, res, [1, 1], [1, 1], [1, 1], 1, True, "torch")
    op = torch.ops.resnet_kernels.conv_bn_act.default
    torch.library.opcheck(op, args)
    from torch._subclasses.fake_tensor import FakeTensorMode
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert fake.stride() == real.stride()


def test_E1_compile_forward_backward_contiguous_grad():
    torch.manual_seed(0)
    block = randomize_bn(BasicBlock(8, 8)).eval()
    fused = rk.convert(block)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = compiled(x)
    y_ref = block(x_ref)
    g = torch.randn(y.shape)  # contiguous, while the activations are channels_last
    y.backward(g)
    y_ref.backward(g)
    assert err(y, y_ref) < 1e-5 and err(x.grad, x_ref.grad) < 1e-5
    for (n, p), (_, q) in zip(block.named_parameters(), fused.named_parameters()):
        assert err(q.grad, p.grad) < 1e-4, n
