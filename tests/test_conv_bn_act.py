"""The op y = act(conv(x, W) * scale + shift + residual) against a float64 oracle, per backend."""
import pytest
import torch
import torch.nn.functional as F

import resnet_kernels as rk
from conftest import FLOOR, assert_matches, err, triton_available

CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_case(n=2, c=16, k=24, h=9, w=11, r=3, stride=1, padding=1, dilation=1, groups=1, dtype=torch.float32,
              channels_last=False, residual="dense", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(k, c // groups, r, r, generator=g) / (c // groups * r * r) ** 0.5
    scale = torch.randn(k, generator=g) * 1.5  # negative and near-zero BN scales occur in trained nets
    scale[0] = 0.0
    shift = torch.randn(k, generator=g) * 0.5
    p = (h + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    q = (w + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    res = None
    if residual == "dense":
        res = torch.randn(n, k, p, q, generator=g)
    elif residual == "channels_last":
        res = torch.randn(n, k, p, q, generator=g).contiguous(memory_format=torch.channels_last)
    elif residual == "view":  # a strided slice of a bigger tensor, transposed storage
        res = torch.randn(n, p, 2 * k, q, generator=g).permute(0, 2, 1, 3)[:, ::2]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return cast(x), cast(wt), scale, shift, cast(res), args


def oracle(x, w, scale, shift, res, args, relu):
    y = F.conv2d(x.double(), w.double(), None, **args)
    y = y * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if res is not None:
        y = y + res.double()
    return y.relu() if relu else y


def unfused(x, w, scale, shift, res, args, relu):
    """What PyTorch computes op by op in x's dtype: the error budget for low precision."""
    y = F.conv2d(x, w, None, **args)
    y = y * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)
    if res is not None:
        y = y + res
    return y.relu() if relu else y


GEOMETRIES = [
    dict(),                                              # 3x3 pad 1
    dict(stride=2),                                      # stride-2 3x3
    dict(r=1, padding=0),                                # 1x1
    dict(r=1, padding=0, stride=2),                      # downsample 1x1 stride 2
    dict(c=3, k=16, r=7, stride=2, padding=3, h=15, w=13),  # stem, C=3
    dict(c=5, k=20, h=7, w=9),                           # channels not multiples of 8
    dict(n=1, h=1, w=1),                                 # 1x1 spatial, batch 1
    dict(dilation=2, padding=2),                         # dilated
    dict(c=16, k=32, groups=4),                          # grouped (ResNeXt)
    dict(c=16, k=16, groups=16),                         # depthwise
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: ",".join(f"{k}={v}" for k, v in g.items()) or "3x3")
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_torch_backend_matches_oracle(geom, dtype, channels_last):
    x, w, s, b, res, args = make_case(dtype=dtype, channels_last=channels_last, **geom)
    for relu, r in ((True, res), (False, None)):
        y = rk.fused_conv_bn_act(x, w, s, b, r, relu=relu, backend="torch", **args)
        ref = oracle(x, w, s, b, r, args, relu)
        assert y.dtype == dtype and y.shape == ref.shape
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last and x.shape[2] * x.shape[3] > 1
                               and x.shape[1] > 1 else torch.contiguous_format)
        assert_matches(y, ref, unfused(x, w, s, b, r, args, relu), dtype)


@pytest.mark.parametrize("residual", ["dense", "channels_last", "view"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_residual_any_strides(residual, channels_last):
    x, w, s, b, res, args = make_case(residual=residual, channels_last=channels_last)
    y = rk.fused_conv_bn_act(x, w, s, b, res, **args)
    assert_matches(y, oracle(x, w, s, b, res, args, True), dtype=torch.float32)


def test_float64_is_exact_path():
    x, w, s, b, res, args = make_case(dtype=torch.float64)
    y = rk.fused_conv_bn_act(x, w, s.double(), b.double(), res, **args)
    assert err(y, oracle(x, w, s, b, res, args, True)) < 1e-12


def test_auto_on_cpu_is_torch_and_named_unavailable_backend_raises():
    x, w, s, b, res, args = make_case()
    from resnet_kernels import backends
    assert backends.resolve("auto", x, w, 1) == "torch"
    with pytest.raises(rk.BackendUnavailable, match="cuda"):
        rk.fused_conv_bn_act(x, w, s, b, res, backend="cuda", **args)
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.fused_conv_bn_act(x, w, s, b, res, backend="cudnn", **args)


def test_env_override_of_auto(monkeypatch):
    from resnet_kernels import backends
    x, w, *_ = make_case()
    monkeypatch.setenv("RESNET_KERNELS_BACKEND", "torch")
    assert backends.resolve("auto", x, w, 1) == "torch"
    monkeypatch.setenv("RESNET_KERNELS_BACKEND", "cuda")
    with pytest.raises(rk.BackendUnavailable):
        backends.resolve("auto", x, w, 1)


def test_in_place_updates_show_in_next_call():
    """An in-place weight or scale update after a call must show in the next call."""
    x, w, s, b, res, args = make_case()
    y1 = rk.fused_conv_bn_act(x, w, s, b, res, **args)
    w.mul_(-1.0)
    y2 = rk.fused_conv_bn_act(x, w, s, b, res, **args)
    assert_matches(y2, oracle(x, w, s, b, res, args, True), dtype=torch.float32)
    s.add_(1.0)
    y3 = rk.fused_conv_bn_act(x, w, s, b, res, **args)
    assert_matches(y3, oracle(x, w, s, b, res, args, True), dtype=torch.float32)
    assert not torch.equal(y1, y2) and not torch.equal(y2, y3)


def test_fold_overflow_falls_back_to_epilogue():
    x, w, s, b, res, args = make_case()
    s[1] = 1e38  # w * scale overflows fp32; conv(x, w) * scale does not necessarily
    w[1] *= 1e-3
    y = rk.fused_conv_bn_act(x, w, s, b, None, relu=False, **args)
    ref = oracle(x, w, s, b, None, args, False)
    assert torch.isfinite(y[:, 1]).all() == torch.isfinite(ref[:, 1]).all()


# --- Triton backend under the interpreter (or a GPU) ------------------------------------------------
triton_only = pytest.mark.skipif(not triton_available(), reason="Triton cannot launch here "
                                 "(no GPU, and TRITON_INTERPRET=1 was not set before import)")


@triton_only
@pytest.mark.parametrize("geom", [dict(), dict(stride=2, r=1, padding=0), dict(c=3, k=8, r=7, stride=2, padding=3,
                                                                               h=12, w=10)],
                         ids=["3x3", "1x1s2", "stem"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_backend_through_the_op(geom, dtype, channels_last):
    x, w, s, b, res, args = make_case(dtype=dtype, channels_last=channels_last, **geom)
    y = rk.fused_conv_bn_act(x, w, s, b, res, backend="triton", **args)
    ref = oracle(x, w, s, b, res, args, True)
    assert_matches(y, ref, unfused(x, w, s, b, res, args, True), dtype)
    yt = rk.fused_conv_bn_act(x, w, s, b, res, backend="torch", **args)
    assert y.stride() == yt.stride(), "backends must agree on the output layout"


@triton_only
def test_triton_backend_rejects_groups_by_name_auto_routes():
    x, w, s, b, res, args = make_case(c=16, k=32, groups=4)
    with pytest.raises(rk.BackendUnavailable, match="groups"):
        rk.fused_conv_bn_act(x, w, s, b, res, backend="triton", **args)
    assert_matches(rk.fused_conv_bn_act(x, w, s, b, res, **args), oracle(x, w, s, b, res, args, True),
                   dtype=torch.float32)


# --- dispatcher integration: opcheck, fake strides, autograd, autocast -------------------------------
OP = torch.ops.resnet_kernels.conv_bn_act.default


def op_args(x, w, s, b, res, args, relu=True, backend="torch"):
    st, pd, dl = ([args.get(k, d)] * 2 for k, d in (("stride", 1), ("padding", 0), ("dilation", 1)))
    return (x, w, s, b, res, st, pd, dl, args.get("groups", 1), relu, backend)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual", [None, "dense", "view"])
def test_opcheck(channels_last, residual):
    x, w, s, b, res, args = make_case(channels_last=channels_last, residual=residual, n=1, c=8, k=8, h=6, w=5)
    torch.library.opcheck(OP, op_args(x, w, s, b, res, args))
    x.requires_grad_(True), w.requires_grad_(True), s.requires_grad_(True), b.requires_grad_(True)
    torch.library.opcheck(OP, op_args(x, w, s, b, res, args))


@pytest.mark.parametrize("shape", [(2, 8, 6, 5), (1, 8, 1, 1), (2, 1, 4, 4), (2, 8, 1, 7)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fake_strides_equal_real_strides(shape, channels_last):
    """E1: the fake kernel must give exactly the real output's strides, ambiguous layouts included."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    n, c, h, w = shape
    x, wt, s, b, _, args = make_case(n=n, c=c, k=c, h=h, w=w, r=1, padding=0, residual=None,
                                     channels_last=channels_last)
    real = OP(*op_args(x, wt, s, b, None, args))
    with FakeTensorMode() as mode:
        fake = OP(*op_args(*(mode.from_tensor(t) for t in (x, wt, s, b)), None, args))
    assert fake.stride() == real.stride() and fake.shape == real.shape and fake.dtype == real.dtype


def test_gradcheck_float64():
    x, w, s, b, res, args = make_case(dtype=torch.float64, n=1, c=3, k=4, h=5, w=5)
    s, b = s.double(), b.double()
    for t in (x, w, s, b, res):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: OP(*op_args(*a, args)), (x, w, s, b, res))
    assert torch.autograd.gradcheck(lambda *a: OP(*op_args(*a, None, args, relu=False)), (x, w, s, b))


def test_autocast_cpu_keeps_bn_constants_fp32():
    x, w, s, b, res, args = make_case(residual=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rk.fused_conv_bn_act(x, w, s, b, None, **args)
    assert y.dtype == torch.bfloat16
    ref = oracle(x.bfloat16(), w.bfloat16(), s, b, None, args, True)
    assert_matches(y, ref, unfused(x.bfloat16(), w.bfloat16(), s, b, None, args, True), torch.bfloat16)


def test_compile_fullgraph_op():
    x, w, s, b, res, args = make_case()
    f = torch.compile(lambda x, res: rk.fused_conv_bn_act(x, w, s, b, res, **args), fullgraph=True)
    assert_matches(f(x, res), oracle(x, w, s, b, res, args, True), dtype=torch.float32)


def test_schema_matches_python_fallback_definition():
    """csrc/ops.cpp and ops.SCHEMAS define the same op (the latter serves extension-less installs)."""
    from resnet_kernels import ops
    assert str(OP._schema) == "resnet_kernels::" + ops.SCHEMAS["conv_bn_act"]


def test_weight_cache_follows_in_place_updates_and_bn_stats():
    """The folded/prepacked weight cache (torch backend) must never serve a stale weight."""
    from resnet_kernels import reference
    for cl in (False, True):
        x, w, s, b, res, args = make_case(channels_last=cl)
        with torch.no_grad():
            rk.fused_conv_bn_act(x, w, s, b, res, **args)
            w.mul_(-1.0)                             # in-place: bumps the version counter
            assert_matches(rk.fused_conv_bn_act(x, w, s, b, res, **args), oracle(x, w, s, b, res, args, True),
                           dtype=torch.float32)
            s2 = s.clone()
            s2[3] = 7.0                              # a new scale object with other values (BN stats moved)
            assert_matches(rk.fused_conv_bn_act(x, w, s2, b, res, **args), oracle(x, w, s2, b, res, args, True),
                           dtype=torch.float32)
            w.data.mul_(2.0)                         # .data bypasses version counters: documented, clear_caches()
            rk.clear_caches()
            assert_matches(rk.fused_conv_bn_act(x, w, s2, b, res, **args), oracle(x, w, s2, b, res, args, True),
                           dtype=torch.float32)
    del w
    import gc
    gc.collect()
    assert len(reference._cache) <= 1  # entries die with their weights


def test_no_cache_while_autograd_records_or_in_float64():
    from resnet_kernels import reference
    rk.clear_caches()
    x, w, s, b, res, args = make_case(channels_last=True)
    w.requires_grad_(True)
    rk.fused_conv_bn_act(x, w, s, b, res, **args).sum().backward()
    assert len(reference._cache) == 0
    with torch.no_grad():
        rk.fused_conv_bn_act(x, w, s, b, res, **args)
        assert len(reference._cache) == 1
        xd, wd, rd = x.double(), w.double(), res.double()
        rk.fused_conv_bn_act(xd, wd, s.double(), b.double(), rd, **args)
        assert len(reference._cache) == 1


@pytest.mark.parametrize("plan", ["onednn", "aten"])
@pytest.mark.parametrize("residual", [None, "dense", "view"])
@pytest.mark.parametrize("geom", [dict(), dict(stride=2, r=1, padding=0), dict(c=3, k=16, r=7, stride=2, padding=3),
                                  dict(c=16, k=32, groups=4), dict(dilation=2, padding=2)],
                         ids=["3x3", "1x1s2", "stem", "groups", "dilated"])
def test_cpu_plans_both_correct(plan, residual, geom):
    """The torch backend picks oneDNN post-ops or ATen conv + in-place epilogue per geometry by
    timing; both must be right, for every residual layout."""
    from resnet_kernels import reference
    x, w, s, b, res, args = make_case(channels_last=True, residual=residual, **geom)
    rk.clear_caches()
    old = dict(reference._plans)
    try:
        reference._plans.clear()
        with torch.no_grad():
            # the first call measures and records a plan for this geometry; force the one under test
            rk.fused_conv_bn_act(x, w, s, b, res, **args)
            assert len(reference._plans) == 1
            key = next(iter(reference._plans))
            reference._plans[key] = plan
            rk.clear_caches()
            for relu in (True, False):
                y = rk.fused_conv_bn_act(x, w, s, b, res, relu=relu, **args)
                assert y.is_contiguous(memory_format=torch.channels_last)
                assert_matches(y, oracle(x, w, s, b, res, args, relu), dtype=torch.float32)
    finally:
        reference._plans.clear()
        reference._plans.update(old)


def test_deterministic_mode_never_measures():
    from resnet_kernels import reference
    x, w, s, b, res, args = make_case(channels_last=True, c=8, k=12)
    rk.clear_caches()
    reference._plans.clear()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad():
            y1 = rk.fused_conv_bn_act(x, w, s, b, res, **args)
            rk.clear_caches()
            y2 = rk.fused_conv_bn_act(x, w, s, b, res, **args)
    finally:
        torch.use_deterministic_algorithms(False)
    assert not reference._plans and torch.equal(y1, y2)
