"""Tests for resnet_kernels.triton.conv_bn_act against a float64 oracle.

Runs on CPU through the Triton interpreter (TRITON_INTERPRET=1 must be set
before triton is imported, hence the first lines) or on a CUDA GPU when the
interpreter is explicitly disabled.  Shapes are kept small because the
interpreter's cost grows with the number of programs and reduction steps.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from resnet_kernels.triton.conv_bn_act import (  # noqa: E402
    CONFIGS,
    conv_bn_act,
    output_channels_last,
    supports,
)

# The module object itself (for monkeypatching internals), not a same-named attribute.
cba = importlib.import_module("resnet_kernels.triton.conv_bn_act")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)

FP32_TOL = 1e-5
FLOOR = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def _randn(shape, dtype, g):
    # Generated on CPU in fp32 with a private generator so every dtype/device
    # sees the same values (up to rounding) and tests are order independent.
    return torch.randn(shape, generator=g).to(dtype=dtype, device=DEVICE)


def make_x(N, C, H, W, dtype, layout, g):
    """x with logical shape [N, C, H, W] in the requested memory layout."""
    if layout == "nchw":
        return _randn((N, C, H, W), dtype, g)
    if layout == "cl":
        return _randn((N, C, H, W), dtype, g).to(memory_format=torch.channels_last)
    if layout == "cl_view":  # strided slice of a bigger channels_last tensor
        big = _randn((N, C + 3, H + 2, W + 3), dtype, g).to(memory_format=torch.channels_last)
        return big[:, 2 : 2 + C, 1 : 1 + H, 3 : 3 + W]
    if layout == "transposed":  # H and W swapped in memory
        return _randn((N, C, W, H), dtype, g).transpose(2, 3)
    raise AssertionError(layout)


def make_residual(N, K, P, Q, dtype, mode, g):
    if mode == "none":
        return None
    if mode == "contig":
        return _randn((N, K, P, Q), dtype, g)
    if mode == "cl":
        return _randn((N, K, P, Q), dtype, g).to(memory_format=torch.channels_last)
    if mode == "view":  # slice of a bigger tensor: no dense layout at all
        big = _randn((N, K + 3, P + 2, Q + 1), dtype, g)
        return big[:, 2 : 2 + K, 1 : 1 + P, :Q]
    if mode == "transposed":
        return _randn((N, K, Q, P), dtype, g).transpose(2, 3)
    raise AssertionError(mode)


def make_scale_shift(K, g):
    scale = torch.randn(K, generator=g)
    scale[::5] = 0.0  # zero scale: output must be exactly shift (+res)
    scale[1] = -abs(scale[1]) - 0.5  # at least one negative scale
    shift = torch.randn(K, generator=g)
    return scale.to(DEVICE), shift.to(DEVICE)


def out_size(H, W, R, S, stride, padding, dilation):
    P = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    return P, Q


def oracle(x, w, scale, shift, res, stride, padding, dilation, relu):
    """Everything in float64 on CPU."""
    y = F.conv2d(x.double().cpu(), w.double().cpu(), None, stride, padding, dilation)
    y = y * scale.double().cpu()[None, :, None, None] + shift.double().cpu()[None, :, None, None]
    if res is not None:
        y = y + res.double().cpu()
    return y.relu() if relu else y


def torch_unfused(x, w, scale, shift, res, stride, padding, dilation, relu):
    """What plain PyTorch gives in x's dtype: conv then separate epilogue ops."""
    dt = x.dtype
    xc, wc = x.cpu(), w.cpu()
    try:
        y = F.conv2d(xc, wc, None, stride, padding, dilation)
    except RuntimeError:  # no low-precision CPU conv: compute in fp32, round once
        y = F.conv2d(xc.float(), wc.float(), None, stride, padding, dilation).to(dt)
    y = y * scale.cpu().to(dt)[None, :, None, None] + shift.cpu().to(dt)[None, :, None, None]
    if res is not None:
        y = y + res.cpu()
    return y.relu() if relu else y


def rel_err(y, ref):
    return ((y.double().cpu() - ref).abs().max() / (ref.abs().max() + 1e-6)).item()


def tolerance(x, w, scale, shift, res, stride, padding, dilation, relu, ref):
    if x.dtype == torch.float32:
        return FP32_TOL
    base = rel_err(torch_unfused(x, w, scale, shift, res, stride, padding, dilation, relu), ref)
    return max(2.0 * base, FLOOR[x.dtype])


def poisoned_out(N, K, P, Q, dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.full((N, K, P, Q), float("nan"), dtype=dtype, device=DEVICE).contiguous(memory_format=fmt)


def check(
    N, C, H, W, K, R, S,
    stride=(1, 1), padding=(0, 0), dilation=(1, 1),
    dtype=torch.float32, layout="nchw", res_mode="none", relu=True,
    config=None, seed=0, check_default_out=True,
):
    """Run the kernel (into a NaN-poisoned `out`) and compare with the oracle."""
    g = _gen(seed)
    x = make_x(N, C, H, W, dtype, layout, g)
    w = _randn((K, C, R, S), dtype, g)
    scale, shift = make_scale_shift(K, g)
    P, Q = out_size(H, W, R, S, stride, padding, dilation)
    res = make_residual(N, K, P, Q, dtype, res_mode, g)
    ref = oracle(x, w, scale, shift, res, stride, padding, dilation, relu)
    assert ref.abs().max() > 0, "degenerate test data"

    # The one case where channels_last cannot be told apart from NCHW.
    want_cl = layout in ("cl", "cl_view") and not (C == 1 and H * W == 1)
    out = poisoned_out(N, K, P, Q, dtype, want_cl)
    y = conv_bn_act(x, w, scale, shift, res, stride, padding, dilation, relu, config=config, out=out)
    assert y is out
    assert y.shape == (N, K, P, Q) and y.dtype == dtype
    assert torch.isfinite(y).all(), "NaN/inf left in output: some elements were not written"
    err = rel_err(y, ref)
    tol = tolerance(x, w, scale, shift, res, stride, padding, dilation, relu, ref)
    assert err <= tol, f"ERR={err:.3e} > tol={tol:.3e}"

    if check_default_out:
        y2 = conv_bn_act(x, w, scale, shift, res, stride, padding, dilation, relu, config=config)
        assert y2.shape == (N, K, P, Q) and y2.dtype == dtype
        if want_cl:
            assert y2.is_contiguous(memory_format=torch.channels_last) and y2.stride(1) == 1
        else:
            assert y2.is_contiguous()
        # Same kernel, same config: bitwise identical whatever the output layout.
        assert torch.equal(y2, y)
    return err


# --------------------------------------------------------------------------- #
# geometry x dtype coverage
# --------------------------------------------------------------------------- #

# (id, N, C, H, W, K, R, S, stride, padding, dilation)
GEOMETRIES = [
    ("3x3_s1_p1", 2, 16, 16, 16, 32, 3, 3, (1, 1), (1, 1), (1, 1)),
    ("3x3_s2_p1", 2, 16, 16, 16, 32, 3, 3, (2, 2), (1, 1), (1, 1)),
    ("1x1_s1", 2, 32, 16, 16, 64, 1, 1, (1, 1), (0, 0), (1, 1)),
    ("1x1_s2", 2, 32, 16, 16, 64, 1, 1, (2, 2), (0, 0), (1, 1)),
    ("stem_7x7_s2_p3_c3", 2, 3, 32, 32, 16, 7, 7, (2, 2), (3, 3), (1, 1)),
    ("ragged_c5_k20", 2, 5, 16, 16, 20, 3, 3, (1, 1), (1, 1), (1, 1)),
    ("odd_7x9", 2, 8, 7, 9, 24, 3, 3, (2, 2), (1, 1), (1, 1)),
    ("input_1x1_pad1", 2, 16, 1, 1, 16, 3, 3, (1, 1), (1, 1), (1, 1)),
    ("input_1x1_k1", 3, 16, 1, 1, 24, 1, 1, (1, 1), (0, 0), (1, 1)),
    ("batch1", 1, 16, 16, 16, 32, 3, 3, (1, 1), (1, 1), (1, 1)),
    ("dil2_pad2", 2, 8, 16, 16, 16, 3, 3, (1, 1), (2, 2), (2, 2)),
    ("asym_s2x3_p4x5", 2, 8, 15, 17, 16, 3, 5, (2, 3), (4, 5), (1, 2)),
]
LAYOUTS = ["nchw", "cl"]
RES_MODES = ["none", "contig", "cl", "view"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: g[0])
def test_geometry(geom, dtype):
    _, N, C, H, W, K, R, S, stride, padding, dilation = geom
    i = GEOMETRIES.index(geom) + DTYPES.index(dtype)
    # Rotate layout / residual / relu deterministically so the cross product is
    # covered across the table without running all of it.
    check(
        N, C, H, W, K, R, S, stride, padding, dilation, dtype=dtype,
        layout=LAYOUTS[i % 2], res_mode=RES_MODES[i % 4], relu=(i % 3 != 2), seed=i,
    )


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("res_mode", ["none", "contig", "cl", "view", "transposed"])
@pytest.mark.parametrize("layout", ["nchw", "cl", "cl_view", "transposed"])
def test_layouts_residual_relu(layout, res_mode, relu):
    check(2, 12, 9, 10, 20, 3, 3, (1, 1), (1, 1), layout=layout, res_mode=res_mode, relu=relu, seed=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_low_precision_residual_layouts(layout, dtype):
    check(2, 24, 10, 10, 40, 3, 3, (2, 2), (1, 1), dtype=dtype, layout=layout, res_mode="view", seed=4)


# --------------------------------------------------------------------------- #
# every config
# --------------------------------------------------------------------------- #


def _cfg_id(c):
    return "M{BLOCK_M}_N{BLOCK_N}_K{BLOCK_K}_w{num_warps}_s{num_stages}".format(**c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("config", CONFIGS, ids=_cfg_id)
def test_field_case_d1_every_config(config, dtype):
    # D1: 3x3, stride (2,3), padding (4,5), N=2, 32->64 channels, 28x30.
    # C=32 runs the nested loop for BLOCK_K=32 configs and the flat one for 64.
    check(
        2, 32, 28, 30, 64, 3, 3, (2, 3), (4, 5), dtype=dtype, layout="cl",
        res_mode="contig", config=config, seed=11, check_default_out=False,
    )


@pytest.mark.parametrize("config", CONFIGS, ids=_cfg_id)
def test_every_config_small_tails(config):
    # M = 2*7*9 = 126 (tail for every BLOCK_M), K = 20 and C = 5 (tails),
    # GEMM-K = 45 (tail for every BLOCK_K).
    check(2, 5, 7, 9, 20, 3, 3, (1, 1), (1, 1), layout="nchw", res_mode="cl", config=config, seed=12,
          check_default_out=False)


@pytest.mark.parametrize("config", CONFIGS, ids=_cfg_id)
def test_every_config_nested_loop_tails(config):
    # C = 3*BLOCK_K exercises the nested (per-tap) loop with several channel
    # blocks, M and K tails and padding.
    C = 3 * config["BLOCK_K"] if config["BLOCK_K"] <= 32 else config["BLOCK_K"]
    assert not cba._use_flat_k({"C": C, "BLOCK_K": config["BLOCK_K"]})
    # Per-dimension stride/padding/dilation differ so an h/w mix-up shows.
    check(1, C, 7, 9, 24, 3, 3, (2, 1), (1, 2), (1, 2), layout="cl", res_mode="none", config=config, seed=13,
          check_default_out=False)


@pytest.mark.parametrize("flat", [True, False], ids=["flat_loop", "nested_loop"])
@pytest.mark.parametrize(
    "geom",
    [
        (2, 5, 9, 7, 20, 3, 3, (2, 1), (1, 2), (1, 1)),  # ragged C, K, M
        (1, 3, 20, 20, 16, 7, 7, (2, 2), (3, 3), (1, 1)),  # stem, GEMM-K = 147
        (1, 40, 7, 6, 24, 3, 3, (1, 2), (2, 1), (2, 1)),  # C = 1.25 * BLOCK_K(32)
    ],
    ids=["ragged", "stem", "c40_dil2"],
)
def test_forced_loop_shape(geom, flat, monkeypatch):
    # The heuristic only sends C % BLOCK_K == 0 down the nested loop; force
    # each loop shape onto ragged shapes so both keep every tail mask honest.
    monkeypatch.setitem(cba._conv_bn_act_heur.values, "FLAT_K", lambda args: flat)
    N, C, H, W, K, R, S, stride, padding, dilation = geom
    check(N, C, H, W, K, R, S, stride, padding, dilation, layout="cl", res_mode="view", config=CONFIGS[7],
          seed=15, check_default_out=False)
    check(N, C, H, W, K, R, S, stride, padding, dilation, dtype=torch.bfloat16, layout="nchw", config=CONFIGS[0],
          seed=16, check_default_out=False)


def test_field_case_d3_fp32_256ch():
    # D3 (interpreter half): fp32 256->256 3x3, N=4, 14x14 (about 2 s interpreted).
    err = check(4, 256, 14, 14, 256, 3, 3, (1, 1), (1, 1), layout="cl", res_mode="contig", seed=21,
                check_default_out=False)
    assert err <= 1e-5


# --------------------------------------------------------------------------- #
# output buffer handling, index width, misc semantics
# --------------------------------------------------------------------------- #


def test_strided_out_view_writes_only_its_elements():
    g = _gen(5)
    N, C, H, W, K = 2, 6, 8, 8, 10
    x = make_x(N, C, H, W, torch.float32, "nchw", g)
    w = _randn((K, C, 3, 3), torch.float32, g)
    scale, shift = make_scale_shift(K, g)
    big = torch.full((N, K + 4, H + 3, W + 2), float("nan"), device=DEVICE)
    out = big[:, 1 : 1 + K, 2 : 2 + H, 1 : 1 + W]
    y = conv_bn_act(x, w, scale, shift, None, (1, 1), (1, 1), relu=False, out=out)
    assert y is out
    ref = oracle(x, w, scale, shift, None, (1, 1), (1, 1), (1, 1), False)
    assert rel_err(out, ref) <= FP32_TOL
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[:, 1 : 1 + K, 2 : 2 + H, 1 : 1 + W] = False
    assert torch.isnan(big[mask]).all(), "kernel wrote outside the out view"


def test_int64_index_path(monkeypatch):
    # Force the 64-bit in-image indexing path (normally only for >2^31 elements).
    monkeypatch.setattr(cba, "_INT32_LIMIT", 16)
    check(2, 5, 9, 8, 12, 3, 3, (1, 1), (1, 1), layout="cl", res_mode="contig", seed=6, check_default_out=False)
    check(1, 64, 6, 6, 16, 3, 3, (1, 1), (1, 1), layout="nchw", config=CONFIGS[4], seed=7, check_default_out=False)


def test_zero_scale_gives_shift_plus_residual():
    g = _gen(8)
    N, C, H, W, K = 1, 4, 5, 5, 6
    x = make_x(N, C, H, W, torch.float32, "nchw", g)
    w = _randn((K, C, 3, 3), torch.float32, g)
    scale = torch.zeros(K, device=DEVICE)
    shift = torch.randn(K, generator=g).to(DEVICE)
    res = _randn((N, K, H, W), torch.float32, g)
    y = conv_bn_act(x, w, scale, shift, res, padding=1, relu=False)
    torch.testing.assert_close(y, shift[None, :, None, None] + res, rtol=0, atol=0)


def test_int_stride_padding_dilation_accepted():
    g = _gen(9)
    x = make_x(1, 4, 11, 11, torch.float32, "nchw", g)
    w = _randn((8, 4, 3, 3), torch.float32, g)
    scale, shift = make_scale_shift(8, g)
    y = conv_bn_act(x, w, scale, shift, None, 2, 2, 2)  # ints mean (v, v)
    ref = oracle(x, w, scale, shift, None, (2, 2), (2, 2), (2, 2), True)
    assert y.shape == ref.shape and rel_err(y, ref) <= FP32_TOL


def test_output_channels_last_rule_ambiguous_cases():
    cl = torch.channels_last
    assert output_channels_last(torch.randn(2, 8, 4, 4).to(memory_format=cl))
    assert not output_channels_last(torch.randn(2, 8, 4, 4))
    # C == 1: both layouts are "contiguous"; the channel stride decides.
    assert output_channels_last(torch.randn(2, 1, 4, 4).to(memory_format=cl))
    assert not output_channels_last(torch.randn(2, 1, 4, 4))
    # H == W == 1: likewise ambiguous.
    assert output_channels_last(torch.randn(2, 8, 1, 1).to(memory_format=cl))
    assert not output_channels_last(torch.randn(2, 8, 1, 1))
    # Strided views follow the layout of their base.
    assert output_channels_last(torch.randn(2, 8, 6, 6).to(memory_format=cl)[:, :4, 1:5, 1:5])
    assert not output_channels_last(torch.randn(2, 8, 6, 6)[:, :4, 1:5, 1:5])


def test_single_channel_channels_last_input():
    # C == 1 channels_last input with padding: output format must follow x.
    check(2, 1, 6, 5, 8, 3, 3, (1, 1), (1, 1), layout="cl", res_mode="none", seed=10)


def test_tf32_rule_pure_parts():
    # Global torch TF32 flags are not touched here (other tests share the
    # process); only the CPU/interpreter rule and the precision-chain resolver.
    assert not cba._tf32_allowed(torch.randn(2, device=DEVICE)) or (DEVICE == "cuda" and not INTERPRET)
    assert cba._precision_says_tf32("none", "tf32", "ieee")
    assert not cba._precision_says_tf32("ieee", "tf32")
    assert not cba._precision_says_tf32("none", "none")


def test_configs_shape():
    assert 6 <= len(CONFIGS) <= 10
    for c in CONFIGS:
        assert set(c) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}
        for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            assert c[k] >= 16 and (c[k] & (c[k] - 1)) == 0


@pytest.mark.skipif(INTERPRET, reason="autotuner needs a GPU timer")
def test_autotuned_path_gpu():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        check(2, 64, 28, 28, 64, 3, 3, (1, 1), (1, 1), dtype=dtype, layout="cl", res_mode="contig", seed=14)


# --------------------------------------------------------------------------- #
# argument checking
# --------------------------------------------------------------------------- #


def _args(C=4, K=6, dtype=torch.float32):
    g = _gen(30)
    x = _randn((1, C, 5, 5), dtype, g)
    w = _randn((K, C, 3, 3), dtype, g)
    scale, shift = make_scale_shift(K, g)
    return x, w, scale, shift


def test_error_groups():
    x, _, scale, shift = _args(C=4, K=6)
    w = torch.randn(6, 2, 3, 3, device=DEVICE)  # what a groups=2 conv weight looks like
    with pytest.raises(ValueError, match="groups must be 1.*groups=2"):
        conv_bn_act(x, w, scale, shift)
    w = torch.randn(6, 3, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight.shape\[1\] must equal x.shape\[1\]=4"):
        conv_bn_act(x, w, scale, shift)
    ok, reason = supports(x, torch.randn(6, 4, 3, 3, device=DEVICE), groups=2)
    assert not ok and "groups" in reason


def test_error_scale_shift():
    x, w, scale, shift = _args(K=6)
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \[K\]=\[6\], got torch.float64"):
        conv_bn_act(x, w, scale.double(), shift)
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \[K\]=\[6\], got .*\[5\]"):
        conv_bn_act(x, w, scale[:5], shift)
    with pytest.raises(ValueError, match=r"shift must be float32 of shape \[K\]=\[6\]"):
        conv_bn_act(x, w, scale, shift.half())
    with pytest.raises(TypeError, match="shift must be a float32 tensor"):
        conv_bn_act(x, w, scale, [0.0] * 6)


def test_error_residual():
    x, w, scale, shift = _args(K=6)
    with pytest.raises(ValueError, match=r"residual must have shape \[N, K, P, Q\]=\[1, 6, 3, 3\]"):
        conv_bn_act(x, w, scale, shift, residual=torch.randn(1, 6, 5, 5, device=DEVICE))
    with pytest.raises(TypeError, match="residual dtype must match x dtype"):
        conv_bn_act(x, w, scale, shift, residual=torch.randn(1, 6, 3, 3, device=DEVICE).half())


def test_error_dtypes_and_shapes():
    x, w, scale, shift = _args()
    with pytest.raises(TypeError, match="weight dtype must match x dtype torch.float32"):
        conv_bn_act(x, w.half(), scale, shift)
    with pytest.raises(TypeError, match="x dtype must be float32, float16 or bfloat16"):
        conv_bn_act(x.double(), w.double(), scale, shift)
    with pytest.raises(ValueError, match="x must be 4-D"):
        conv_bn_act(x[0], w, scale, shift)
    with pytest.raises(ValueError, match="weight must be 4-D"):
        conv_bn_act(x, w[0], scale, shift)
    ok, reason = supports(x, w.half())
    assert not ok and "dtype" in reason


def test_error_conv_params():
    x, w, scale, shift = _args()
    with pytest.raises(ValueError, match="stride must be >= 1"):
        conv_bn_act(x, w, scale, shift, stride=(0, 1))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        conv_bn_act(x, w, scale, shift, padding=(-1, 0))
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        conv_bn_act(x, w, scale, shift, dilation=(1, 0))
    with pytest.raises(TypeError, match="stride must be an int or a 2-tuple"):
        conv_bn_act(x, w, scale, shift, stride=(1, 1, 1))
    with pytest.raises(ValueError, match="output spatial size must be >= 1"):
        conv_bn_act(x, w, scale, shift, dilation=(3, 3))


def test_error_out_and_config():
    x, w, scale, shift = _args(K=6)
    with pytest.raises(ValueError, match=r"out must have shape \[N, K, P, Q\]=\[1, 6, 3, 3\]"):
        conv_bn_act(x, w, scale, shift, out=torch.empty(1, 6, 5, 5, device=DEVICE))
    with pytest.raises(TypeError, match="out dtype must match"):
        conv_bn_act(x, w, scale, shift, out=torch.empty(1, 6, 3, 3, device=DEVICE, dtype=torch.float16))
    res = torch.randn(1, 6, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="out must not share memory with residual"):
        conv_bn_act(x, w, scale, shift, residual=res, out=res)
    with pytest.raises(ValueError, match="config is missing keys"):
        conv_bn_act(x, w, scale, shift, config={"BLOCK_M": 64})
    bad = dict(CONFIGS[0], BLOCK_K=8)
    with pytest.raises(ValueError, match=r"config\['BLOCK_K'\] must be a power of two >= 16"):
        conv_bn_act(x, w, scale, shift, config=bad)


def test_supports_ok_and_reasons():
    x, w, _, _ = _args()
    assert supports(x, w) == (True, "ok")
    assert supports(x, w, residual=torch.randn(1, 6, 3, 3, device=DEVICE)) == (True, "ok")
    ok, reason = supports(x, w, residual=torch.randn(1, 6, 4, 4, device=DEVICE))
    assert not ok and "residual shape" in reason
    ok, reason = supports(x[0], w)
    assert not ok and "4-D" in reason
    ok, reason = supports(x, w, dilation=(3, 3))
    assert not ok and "empty" in reason
