"""Bad input gets a clear error naming the argument and the rule, never a wrong answer."""
import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock

import resnet_kernels as rk


def good():
    return dict(x=torch.randn(2, 8, 6, 6), weight=torch.randn(16, 8, 3, 3), scale=torch.randn(16),
                shift=torch.randn(16), residual=torch.randn(2, 16, 6, 6), padding=1)


def with_(**kw):
    d = good()
    d.update(kw)
    return d


CASES = [
    ("x rank", with_(x=torch.randn(8, 6, 6)), ValueError, r"x must be a 4-D tensor"),
    ("x dtype", with_(x=torch.randint(0, 3, (2, 8, 6, 6))), TypeError, r"x must be float32, float16, bfloat16"),
    ("weight rank", with_(weight=torch.randn(16, 72)), ValueError, r"weight must be a 4-D tensor"),
    ("weight dtype", with_(weight=torch.randn(16, 8, 3, 3).half()), TypeError, r"weight must have x's dtype"),
    ("channel count", with_(x=torch.randn(2, 5, 6, 6)), ValueError, r"x has C=5 channels .* expects C=8"),
    ("groups divide", with_(groups=3), ValueError, r"groups=3 must divide"),
    ("scale shape", with_(scale=torch.randn(15)), ValueError, r"scale must be a 1-D tensor of the K=16"),
    ("shift dtype", with_(shift=torch.randn(16).half()), TypeError, r"shift must be torch.float32"),
    ("residual shape", with_(residual=torch.randn(2, 16, 5, 6)), ValueError,
     r"residual must have the output's shape \[2, 16, 6, 6\]"),
    ("residual dtype", with_(residual=torch.randn(2, 16, 6, 6).double()), TypeError, r"residual must have x's dtype"),
    ("weight device", with_(weight=torch.randn(16, 8, 3, 3, device="meta")), ValueError,
     r"weight must be on x's device"),
    ("residual device", with_(residual=torch.randn(2, 16, 6, 6, device="meta")), ValueError,
     r"residual must be on x's device"),
    ("too small", with_(x=torch.randn(2, 8, 1, 1), padding=0, residual=None), ValueError, r"too small"),
    ("stride", with_(stride=0), ValueError, r"stride and dilation must be >= 1"),
    ("padding string", with_(padding="same"), ValueError, r"padding must be an int or a pair"),
    ("backend", with_(backend="tensorrt"), ValueError, r"backend must be one of"),
    ("backend unavailable", with_(backend="cuda"), rk.BackendUnavailable, r"cuda"),
]


@pytest.mark.parametrize("name,kwargs,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_functional_errors(name, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        rk.fused_conv_bn_act(**kwargs)


@pytest.mark.parametrize("name,kwargs,exc,pattern", [c for c in CASES if c[0] not in
                                                      ("padding string", "backend", "backend unavailable", "stride")],
                         ids=[c[0] for c in CASES if c[0] not in ("padding string", "backend", "backend unavailable",
                                                                   "stride")])
def test_op_level_errors(name, kwargs, exc, pattern):
    """Calling torch.ops directly validates just the same (real and fake kernels share the checks)."""
    k = kwargs
    st = [k.get("stride", 1)] * 2
    pd = [k.get("padding", 0)] * 2
    with pytest.raises(exc, match=pattern):
        torch.ops.resnet_kernels.conv_bn_act(k["x"], k["weight"], k["scale"], k["shift"], k["residual"], st, pd,
                                             [1, 1], k.get("groups", 1), True, "torch")


def test_module_errors_are_clear():
    block = rk.convert(BasicBlock(8, 8).eval())
    with pytest.raises(ValueError, match=r"x has C=5 channels"):
        block(torch.randn(1, 5, 6, 6))
    with pytest.raises(TypeError, match=r"weight must have x's dtype"):
        block(torch.randn(1, 8, 6, 6).double().half())
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor"):
        block(torch.randn(8, 6, 6))


def test_float64_named_triton_raises_auto_routes():
    d = good()
    d = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    with pytest.raises(rk.BackendUnavailable):
        rk.fused_conv_bn_act(**d, backend="triton")
    assert rk.fused_conv_bn_act(**d).dtype == torch.float64


def test_empty_batch():
    d = with_(x=torch.randn(0, 8, 6, 6), residual=torch.randn(0, 16, 6, 6))
    y = rk.fused_conv_bn_act(**d)
    assert y.shape == (0, 16, 6, 6)


def test_nan_inf_propagate_like_reference():
    d = good()
    d["x"][0, 0, 2, 2] = float("nan")
    d["x"][1, 1, 3, 3] = float("inf")
    y = rk.fused_conv_bn_act(**d)
    ref = torch.nn.functional.conv2d(d["x"], d["weight"], None, 1, 1) * d["scale"].view(1, -1, 1, 1) \
        + d["shift"].view(1, -1, 1, 1) + d["residual"]
    ref = ref.relu()
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
