"""Training mode (BN with batch statistics): the ops, their gradients, nn.BatchNorm2d's exact
running-statistics semantics, and a converted resnet18 trained next to torchvision.

Oracles: float64 gradcheck of the ops; float64 torchvision/nn modules for values; the
unconverted module in the same dtype for the tolerance rule of FIELD_CASES.md."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

import resnet_kernels as rk
from resnet_kernels import ops
from conftest import FLOOR, assert_matches, err, randomize_bn, real_photo, triton_available

OP = torch.ops.resnet_kernels.conv_bn_train.default
BWD = torch.ops.resnet_kernels.bn_act_train_backward.default
UPD = torch.ops.resnet_kernels.bn_update_running_stats_.default


def oracle(x, w, gamma, beta, res, stride, padding, relu, eps=1e-5):
    """float64 conv -> batch-stat BN -> + res -> relu, with torch's own F.batch_norm."""
    y = F.conv2d(x.double(), w.double(), None, stride, padding)
    y = F.batch_norm(y, None, None, None if gamma is None else gamma.double(),
                     None if beta is None else beta.double(), training=True, eps=eps)
    if res is not None:
        y = y + res.double()
    return y.relu() if relu else y


def case(n=2, c=4, k=6, h=5, w=5, r=3, stride=1, padding=1, dtype=torch.float64, residual=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    wt = (torch.randn(k, c, r, r, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    gamma = torch.rand(k, generator=g, dtype=torch.float64) * 2 - 0.5  # some negative
    beta = torch.randn(k, generator=g, dtype=torch.float64) * 0.3
    p = (h + 2 * padding - r) // stride + 1
    q = (w + 2 * padding - r) // stride + 1
    res = torch.randn(n, k, p, q, generator=g, dtype=torch.float64).to(dtype) if residual else None
    if dtype != torch.float64:
        gamma, beta = gamma.float(), beta.float()
    return x, wt, gamma, beta, res


# --- the ops ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(relu, residual, affine):
    x, w, gamma, beta, res = case(residual=residual)
    if not affine:
        gamma = beta = None
    inputs = [t.requires_grad_() for t in (x, w, gamma, beta, res) if t is not None]

    def f(*ts):
        it = iter(ts)
        xx, ww = next(it), next(it)
        gg = next(it) if affine else None
        bb = next(it) if affine else None
        rr = next(it) if residual else None
        return OP(xx, ww, gg, bb, rr, [1, 1], [1, 1], [1, 1], 1, 1e-5, relu, "torch")[0]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_outputs_match_float64_oracle_and_stats():
    x, w, gamma, beta, res = case(n=3, c=5, k=7, h=7, w=6, stride=2)
    out, y, mean, var = OP(x, w, gamma, beta, res, [2, 2], [1, 1], [1, 1], 1, 1e-5, True, "torch")
    assert err(out, oracle(x, w, gamma, beta, res, 2, 1, True)) < 1e-12
    conv = F.conv2d(x, w, None, 2, 1)
    assert err(y, conv) < 1e-12
    assert err(mean, conv.mean((0, 2, 3))) < 1e-12
    assert err(var, conv.var((0, 2, 3), correction=0)) < 1e-12


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_opcheck(fmt):
    x, w, gamma, beta, res = case(dtype=torch.float32)
    if fmt == "nhwc":
        x, res = x.contiguous(memory_format=torch.channels_last), res.contiguous(memory_format=torch.channels_last)
    args = (x.requires_grad_(), w.requires_grad_(), gamma.requires_grad_(), beta.requires_grad_(),
            res.requires_grad_(), [1, 1], [1, 1], [1, 1], 1, 1e-5, True, "torch")
    torch.library.opcheck(OP, args)
    out, y, mean, var = OP(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    g = torch.randn_like(out)
    torch.library.opcheck(BWD, (g, out, y, mean, var, gamma.detach(), 1e-5, True, "torch"))
    torch.library.opcheck(BWD, (g, out, y, mean, var, None, 1e-5, False, "torch"))
    rm, rv, nbt = torch.zeros(6), torch.ones(6), torch.tensor(0)
    torch.library.opcheck(UPD, (rm, rv, nbt, mean, var, 50, 0.1))
    torch.library.opcheck(UPD, (rm, rv, nbt, mean, var, 50, None))


def test_fake_strides_equal_real_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, w, gamma, beta, res = case(dtype=torch.float32)
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        real = OP(xx, w, gamma, beta, res, [1, 1], [1, 1], [1, 1], 1, 1e-5, True, "torch")
        with FakeTensorMode() as mode:
            fake = OP(*[mode.from_tensor(t) for t in (xx, w, gamma, beta, res)], [1, 1], [1, 1], [1, 1], 1, 1e-5,
                      True, "torch")
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype


def test_single_value_per_channel_raises_like_batchnorm():
    """A4(c): N=1, H=W=1 in training raises BatchNorm's own ValueError, not NaN."""
    bn = nn.BatchNorm2d(4).train()
    with pytest.raises(ValueError) as ref:
        bn(torch.randn(1, 4, 1, 1))
    x = torch.randn(1, 3, 1, 1)
    w = torch.randn(4, 3, 1, 1)
    with pytest.raises(ValueError) as ours:
        rk.fused_conv_bn_train(x, w, bn.weight, bn.bias)
    assert str(ours.value) == str(ref.value)


def test_bad_arguments_name_the_rule():
    x, w, gamma, beta, res = case(dtype=torch.float32)
    with pytest.raises(ValueError, match="gamma must be None or a 1-D tensor of the K=6"):
        rk.fused_conv_bn_train(x, w, gamma[:3], beta, res, padding=1)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        rk.fused_conv_bn_train(x, w, gamma, beta, res[:, :3], padding=1)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        rk.fused_conv_bn_train(x, w.double(), gamma, beta, res, padding=1)
    with pytest.raises(rk.BackendUnavailable, match="cuda"):
        rk.fused_conv_bn_train(x, w, gamma, beta, res, padding=1, backend="cuda")


# --- nn.BatchNorm2d semantics ------------------------------------------------------------------------
def _conv_bn(c=8, k=8, **bn_kw):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c, k, 3, padding=1, bias=False), nn.BatchNorm2d(k, **bn_kw), nn.ReLU())


def _assert_same_state(fused, ref):
    for (n1, b1), (n2, b2) in zip(ref.named_buffers(), fused.named_buffers()):
        assert n1 == n2
        if b1.is_floating_point():
            torch.testing.assert_close(b2, b1, rtol=1e-5, atol=1e-6, msg=n1)
        else:
            assert torch.equal(b1, b2), (n1, b1, b2)


@pytest.mark.parametrize("momentum", [None, 0.1, 0.0, 1.0])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_E3_momentum_modes_every_step(momentum, compiled):
    ref = _conv_bn(momentum=momentum).train()
    fused = rk.convert(copy.deepcopy(ref)).train()
    run = torch.compile(fused, fullgraph=True) if compiled else fused
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(8, 8, 16, 16, generator=g) * (1 + step)
        y_ref, y = ref(x), run(x)
        assert err(y, y_ref) < 1e-5, step
        _assert_same_state(fused, ref)
    ref.eval(), fused.eval()
    x = torch.randn(2, 8, 16, 16, generator=g)
    with torch.no_grad():
        assert err(fused(x), ref(x)) < 1e-5  # eval after train uses the updated statistics


@pytest.mark.parametrize("variant", ["untracked", "tracking_turned_off", "affine_false"])
@pytest.mark.parametrize("n,hw", [(1, 8), (8, 1), (8, 8)])
def test_A4_running_stat_modes(variant, n, hw):
    torch.manual_seed(0)
    kw = {"untracked": dict(track_running_stats=False), "affine_false": dict(affine=False)}.get(variant, {})
    block = BasicBlock(64, 64, norm_layer=lambda c: nn.BatchNorm2d(c, **kw))
    randomize_bn(block)
    if variant == "tracking_turned_off":
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats = False
    fused = rk.convert(copy.deepcopy(block))
    assert isinstance(fused, rk.FusedBasicBlock) or variant == "untracked"
    x = torch.randn(n, 64, hw, hw)
    for mode in ("train", "eval", "train"):
        getattr(block, mode)(), getattr(fused, mode)()
        if n * hw * hw == 1 and mode == "train":
            continue
        with torch.no_grad():
            assert err(fused(x), block(x)) < 1e-5, mode
        _assert_same_state(fused, block)


def test_eval_train_eval_has_no_stale_constants():
    ref = randomize_bn(_conv_bn()).eval()
    fused = rk.convert(copy.deepcopy(ref)).eval()
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        assert err(fused(x), ref(x)) < 1e-5
        ref.train(), fused.train()
        for _ in range(3):
            xt = torch.randn(4, 8, 6, 6) * 3 + 1
            assert err(fused(xt), ref(xt)) < 1e-5
        ref.eval(), fused.eval()
        assert err(fused(x), ref(x)) < 1e-5


# --- gradients of whole blocks -------------------------------------------------------------------
def _grads(module, x):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y, x.grad, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


BLOCKS = {
    "basic_down_s2": lambda: BasicBlock(8, 16, 2, nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16))),
    "bottleneck": lambda: Bottleneck(32, 8),
    "resnext": lambda: Bottleneck(32, 8, groups=4, base_width=16),
}


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_block_gradients_match_float64_torchvision(name, channels_last):
    torch.manual_seed(0)
    block = randomize_bn(BLOCKS[name]()).train()
    fused = rk.convert(copy.deepcopy(block)).train()
    x = torch.randn(3, block.conv1.in_channels, 9, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y64, gx64, gp64 = _grads(copy.deepcopy(block).double(), x.double())
    y32, gx32, gp32 = _grads(block, x)
    y, gx, gp = _grads(fused, x)
    assert_matches(y, y64, y32)
    assert_matches(gx, gx64, gx32)
    assert set(gp) == set(gp64)
    for n in gp64:
        assert_matches(gp[n], gp64[n], gp32[n], floor=2e-5)
    assert (y.is_contiguous(memory_format=torch.channels_last) == channels_last) or y.shape[1] == 1


def test_frozen_parameters_get_no_gradient():
    torch.manual_seed(0)
    block = BLOCKS["basic_down_s2"]()
    for p in (block.bn1.weight, block.bn1.bias, block.conv2.weight):
        p.requires_grad_(False)
    fused = rk.convert(block).train()
    _, gx, grads = _grads(fused, torch.randn(2, 8, 6, 6))
    assert gx is not None
    assert "bn1.weight" not in grads and "bn1.bias" not in grads and "conv2.weight" not in grads
    assert "conv1.weight" in grads and "bn2.weight" in grads


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_autocast_training_block(dtype):
    torch.manual_seed(0)
    block = randomize_bn(BLOCKS["bottleneck"]()).train()
    fused = rk.convert(copy.deepcopy(block)).train()
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    y64, gx64, gp64 = _grads(copy.deepcopy(block).double(), x.double())
    with torch.autocast("cpu", dtype=dtype):
        y_ref, gx_ref, gp_ref = _grads(block, x)
        y, gx, gp = _grads(fused, x)
    assert y.dtype == y_ref.dtype == dtype
    assert_matches(y, y64, y_ref, dtype=dtype)
    assert_matches(gx.float(), gx64, gx_ref.float(), dtype=dtype)
    for n in gp64:
        assert gp[n].dtype == torch.float32  # parameters (and their grads) stay fp32 under AMP
        assert_matches(gp[n], gp64[n], gp_ref[n], dtype=dtype)
    for (n1, b1), (_, b2) in zip(block.named_buffers(), fused.named_buffers()):
        if b1.is_floating_point():
            torch.testing.assert_close(b2, b1, rtol=2e-2, atol=2e-2, msg=n1)


def test_E2_compile_forward_backward_matches_eager():
    torch.manual_seed(0)
    block = randomize_bn(BLOCKS["basic_down_s2"]()).train()
    eager = rk.convert(copy.deepcopy(block)).train()
    compiled_mod = rk.convert(copy.deepcopy(block)).train()
    compiled = torch.compile(compiled_mod, fullgraph=True)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    y1, gx1, gp1 = _grads(eager, x)
    y2, gx2, gp2 = _grads(compiled, x)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx2, gx1, rtol=1e-5, atol=1e-5)
    gp2 = {n.replace("_orig_mod.", ""): g for n, g in gp2.items()}
    assert set(gp2) == set(gp1)
    for n in gp1:
        torch.testing.assert_close(gp2[n], gp1[n], rtol=1e-4, atol=1e-5, msg=n)
    _assert_same_state(compiled_mod, eager)


def test_E2_outputs_never_alias_inputs():
    x, w, gamma, beta, res = case(dtype=torch.float32)
    outs = OP(x, w, gamma, beta, res, [1, 1], [1, 1], [1, 1], 1, 1e-5, False, "torch")
    ptrs = {t.data_ptr() for t in (x, w, gamma, beta, res)}
    assert not any(o.data_ptr() in ptrs for o in outs)
    # an in-place op on the output after the op is either correct or refused, never silent
    xr = x.clone().requires_grad_()
    out = rk.fused_conv_bn_train(xr, w, gamma, beta, res, padding=1, relu=True)
    out.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# --- a converted resnet18 trained next to torchvision ---------------------------------------------
@pytest.mark.slow
def test_resnet18_sgd_steps_match_torchvision():
    """Four SGD steps of a converted resnet18 next to torchvision in fp32 and in float64 on the
    same real photos: the converted model's losses, parameters and running statistics stay as
    close to float64 as torchvision's own fp32 run is (fp32 rounding differences grow over
    steps in both); num_batches_tracked is exact."""
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).train()
    models = {"ref64": copy.deepcopy(ref).double(), "ref32": ref, "fused": rk.convert(copy.deepcopy(ref)).train()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9) for k, m in models.items()}
    photos = torch.cat([real_photo(64, w) for w in ("chelsea", "astronaut", "coffee")] * 2)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    for step in range(4):
        losses = {}
        for k, m in models.items():
            opts[k].zero_grad()
            x = photos.double() if k == "ref64" else photos
            loss = F.cross_entropy(m(x), labels)
            loss.backward()
            opts[k].step()
            losses[k] = loss.item()
        d_ref = abs(losses["ref32"] - losses["ref64"])
        d_fused = abs(losses["fused"] - losses["ref64"])
        assert d_fused <= max(4 * d_ref, 1e-5), (step, losses)
    named = {k: dict(m.named_parameters()) for k, m in models.items()}
    for n, p64 in named["ref64"].items():
        e_ref, e_fused = err(named["ref32"][n], p64), err(named["fused"][n], p64)
        assert e_fused <= max(4 * e_ref, 1e-5), (n, e_fused, e_ref)
    bufs = {k: dict(m.named_buffers()) for k, m in models.items()}
    for n, b64 in bufs["ref64"].items():
        if b64.is_floating_point():
            e_ref, e_fused = err(bufs["ref32"][n], b64), err(bufs["fused"][n], b64)
            assert e_fused <= max(4 * e_ref, 1e-5), (n, e_fused, e_ref)
        else:
            assert torch.equal(bufs["fused"][n], b64), n
    assert int(models["fused"].bn1.num_batches_tracked) == 4


# --- Triton backend under the interpreter -----------------------------------------------------------
needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton (interpreter) is not available here")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geom", ["3x3_s1", "1x1_s2_odd", "stem_c3"])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_triton_forward_backward_match_torch_backend(dtype, geom, fmt):
    kw = {"3x3_s1": dict(c=16, k=16, h=8, w=8, r=3, stride=1, padding=1),
          "1x1_s2_odd": dict(c=8, k=20, h=9, w=7, r=1, stride=2, padding=0),
          "stem_c3": dict(c=3, k=16, h=11, w=11, r=7, stride=2, padding=3)}[geom]
    x, w, gamma, beta, res = case(n=2, dtype=torch.float64, **kw)
    if fmt == "nhwc":
        x, res = x.contiguous(memory_format=torch.channels_last), res.contiguous(memory_format=torch.channels_last)
    # float64 oracle: values and gradients through torch's own F.batch_norm
    leaves64 = [t.clone().requires_grad_() for t in (x, w, gamma, beta, res)]
    ref = oracle(*leaves64, kw["stride"], kw["padding"], True)
    results = {}
    for backend in ("torch", "triton"):
        xs, ws, rs = (t.to(dtype).requires_grad_() for t in (x, w, res))
        gs, bs = (t.float().requires_grad_() for t in (gamma, beta))
        out = rk.fused_conv_bn_train(xs, ws, gs, bs, rs, stride=kw["stride"], padding=kw["padding"],
                                     backend=backend)
        want = OP(xs.detach(), ws.detach(), None, None, None, [kw["stride"]] * 2, [kw["padding"]] * 2, [1, 1], 1,
                  1e-5, True, "torch")[0]
        assert out.dtype == dtype and out.stride() == want.stride()
        gout = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        out.backward(gout.to(dtype))
        results[backend] = (out, xs.grad, ws.grad, gs.grad, bs.grad, rs.grad)
    ref.backward(gout)
    ref64 = (ref,) + tuple(t.grad for t in leaves64)
    # Each value and gradient within the rule: 2x the torch backend's own error in this dtype
    # (its conv is oneDNN's; BN math fp32 in both), with the dtype's floor.
    # The residual's gradient is grad * (out > 0): where the pre-activation is within rounding of 0
    # the mask itself may flip in low precision (in any implementation); judge it elsewhere.
    pre = oracle(x, w, gamma, beta, res, kw["stride"], kw["padding"], False)
    clear = pre.abs() > 4 * FLOOR[dtype] * pre.abs().max()
    for name, a, b, r in zip(("out", "dx", "dw", "dgamma", "dbeta", "dres"), results["triton"],
                             results["torch"], ref64):
        if name == "dres":
            a, b, r = a.float() * clear, b.float() * clear, r * clear
        assert_matches(a.float(), r, b.float(), dtype=dtype, factor=2.0), name


@needs_triton
@pytest.mark.parametrize("cfg", range(8))
def test_triton_stats_every_conv_config(cfg):
    """D1 for the statistics epilogue: every tile config gives the batch mean/var (tiles of
    every size combine exactly, including a partial last tile) and the conv output."""
    from resnet_kernels.triton import conv_bn_act as tconv, conv_bn_train as ttrain
    x, w, gamma, beta, res = case(n=3, c=16, k=24, h=9, w=11, dtype=torch.float64)  # M = 297: ragged tiles
    x32, w32, res32 = x.float(), w.float(), res.float()
    out, y, mean, var = ttrain.conv_bn_train(x32, w32, gamma.float(), beta.float(), res32, (1, 1), (1, 1), (1, 1),
                                             1e-5, True, config=tconv.CONFIGS[cfg])
    conv = F.conv2d(x, w, None, 1, 1)
    assert err(y, conv) < 1e-5
    assert err(mean, conv.mean((0, 2, 3))) < 1e-5
    assert err(var, conv.var((0, 2, 3), correction=0)) < 1e-5
    assert err(out, oracle(x, w, gamma, beta, res, 1, 1, True)) < 1e-5


@needs_triton
def test_triton_stats_survive_a_large_mean():
    """Per-tile deviations, not raw sums of squares: a channel whose mean is 1e3 x its spread
    still gets its variance (sum-of-squares in fp32 would cancel to noise)."""
    from resnet_kernels.triton import conv_bn_train as ttrain
    x, w, gamma, beta, res = case(n=4, c=8, k=8, h=8, w=8, dtype=torch.float64)
    x = x * 1e-3 + 1.0  # conv output ~ constant + tiny spread
    out, y, mean, var = ttrain.conv_bn_train(x.float(), w.float(), gamma.float(), beta.float(), None, (1, 1),
                                             (0, 0), (1, 1), 1e-5, False)
    conv = F.conv2d(x.float().double(), w.float().double())
    v64 = conv.var((0, 2, 3), correction=0)
    # y itself is rounded to fp32 (relative 6e-8 of |y| ~ 1e3 x spread): the variance is known to ~1e-3
    assert ((var.double() - v64).abs() / v64).max() < 2e-2
