"""Bad input, table-driven, for every public entry point: a clear error that names the argument
and the rule, or a correct result (compared with the unfused reference, NaN/Inf positions included).

Entry points: rk.fused_conv_bn_act (every backend here), rk.fused_conv_bn_train, FusedConvBNAct,
FusedBasicBlock, FusedBottleneck (eval and train), rk.convert. Kinds: wrong device (the 'meta'
device plays the second device on a CPU machine), dtype, rank, shape, channel count, residual shape,
mixed devices, NaN/Inf inputs, empty batch, non-contiguous and overlapping-stride tensors
(expand()ed, as_strided windows).
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

import resnet_kernels as rk
from resnet_kernels import backends
from conftest import assert_matches, randomize_bn

@pytest.fixture(autouse=True)
def _onednn_plan_everywhere(monkeypatch):
    """The torch backend's CPU fp32 channels_last calls take the oneDNN post-op plan for every geometry
    (it is otherwise chosen by timing, so a geometry might never exercise it): the plan whose ReLU
    post-op maps NaN to 0 must still give exact NaN/Inf positions. The ATen plan is exact by itself."""
    from resnet_kernels import reference
    monkeypatch.setattr(reference, "_plans", {})
    monkeypatch.setattr(reference, "_faster", lambda a, b, reps=2: "onednn")
    rk.clear_caches()
    yield
    rk.clear_caches()


def _same_nonfinite(y, ref):
    y, ref = y.detach().double(), ref.detach().double()
    for f in (torch.isnan, lambda t: t == math.inf, lambda t: t == -math.inf):
        assert torch.equal(f(y), f(ref)), "non-finite values are not where the reference has them"


def _check_result(y, ref, x):
    """y equals the reference's result: shape, dtype, layout, the tolerance rule where both are finite,
    and then the exact NaN/+inf/-inf positions (CPU fp32 channels_last included: oneDNN's ReLU post-op,
    which maps NaN to 0, must not be taken when a NaN/Inf is around)."""
    assert y.shape == ref.shape and y.dtype == x.dtype
    fmt = torch.channels_last if backends.is_channels_last(x) else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), "the output follows x's memory format"
    fin = torch.isfinite(ref) & torch.isfinite(y.double())
    if fin.any():
        assert_matches(torch.where(fin, y.double(), 0.0), torch.where(fin, ref.double(), 0.0), dtype=torch.float64,
                       floor={torch.float32: 1e-5, torch.float64: 1e-12}.get(x.dtype, 5e-3))
    _same_nonfinite(y, ref)


# --- the functional inference op ------------------------------------------------------------------------
def base(n=2, c=8, k=16, h=6, w=6):
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(n, c, h, w, generator=g), weight=torch.randn(k, c, 3, 3, generator=g) / 8,
                scale=torch.rand(k, generator=g) + 0.5, shift=torch.randn(k, generator=g),
                residual=torch.randn(n, k, h, w, generator=g), padding=1)


def fn_ref(d):
    """The unfused ops in float64 (NaN/Inf propagate as in PyTorch)."""
    y = F.conv2d(d["x"].double(), d["weight"].double(), None, d.get("stride", 1), d["padding"])
    y = y * d["scale"].double().view(1, -1, 1, 1) + d["shift"].double().view(1, -1, 1, 1)
    if d["residual"] is not None:
        y = y + d["residual"].double()
    return y.relu() if d.get("relu", True) else y


def with_(**kw):
    d = base()
    for key, v in kw.items():
        d[key] = v(d) if callable(v) else v
    return d


def _nan_inf_x(d):
    x = d["x"].clone()
    x[0, 0, 2, 2], x[1, 3, 0, 5], x[1, 5, 4, 1] = float("nan"), float("inf"), float("-inf")
    return x


def _overlap_x(d):  # overlapping windows: every image and channel views the same 64 floats
    return torch.randn(64).as_strided((2, 8, 6, 6), (0, 2, 6, 1))


E = "raises"
FN_CASES = [  # name, kwargs, (E, exception, pattern) or "ok"
    ("x on another device", with_(x=lambda d: d["x"].to("meta")), (E, ValueError, r"weight must be on x's device")),
    ("weight on another device", with_(weight=lambda d: d["weight"].to("meta")),
     (E, ValueError, r"weight must be on x's device")),
    ("scale on another device", with_(scale=lambda d: d["scale"].to("meta")),
     (E, ValueError, r"scale must be on x's device")),
    ("residual on another device", with_(residual=lambda d: d["residual"].to("meta")),
     (E, ValueError, r"residual must be on x's device")),
    ("x integer", with_(x=lambda d: d["x"].long()), (E, TypeError, r"x must be float32, float16, bfloat16")),
    ("x complex", with_(x=lambda d: d["x"].to(torch.complex64)), (E, TypeError, r"x must be float32")),
    ("weight dtype", with_(weight=lambda d: d["weight"].half()), (E, TypeError, r"weight must have x's dtype")),
    ("scale dtype", with_(scale=lambda d: d["scale"].double()), (E, TypeError, r"scale must be torch.float32")),
    ("residual dtype", with_(residual=lambda d: d["residual"].half()), (E, TypeError, r"residual must have x's dtype")),
    ("x rank 3", with_(x=lambda d: d["x"][0]), (E, ValueError, r"x must be a 4-D tensor")),
    ("x rank 5", with_(x=lambda d: d["x"][None]), (E, ValueError, r"x must be a 4-D tensor")),
    ("x not a tensor", with_(x=lambda d: d["x"].tolist()), (E, ValueError, r"x must be a 4-D tensor")),
    ("weight rank", with_(weight=lambda d: d["weight"].flatten(1)), (E, ValueError, r"weight must be a 4-D tensor")),
    ("channel count", with_(x=lambda d: d["x"][:, :5]), (E, ValueError, r"x has C=5 channels .* expects C=8")),
    ("scale length", with_(scale=lambda d: d["scale"][:3]), (E, ValueError, r"scale must be a 1-D tensor of the K=16")),
    ("shift rank", with_(shift=lambda d: d["shift"].view(4, 4)), (E, ValueError, r"shift must be a 1-D tensor")),
    ("residual shape", with_(residual=lambda d: d["residual"][:, :, :5]),
     (E, ValueError, r"residual must have the output's shape \[2, 16, 6, 6\]")),
    ("residual broadcastable", with_(residual=lambda d: d["residual"][:1]),
     (E, ValueError, r"residual must have the output's shape")),
    ("input too small", with_(x=lambda d: d["x"][:, :, :1, :1], padding=0, residual=None),
     (E, ValueError, r"too small for a 3x3 filter")),
    ("negative padding", with_(padding=-1), (E, ValueError, r"padding >= 0")),
    ("zero dilation", with_(dilation=0), (E, ValueError, r"dilation must be >= 1")),
    ("groups 0", with_(groups=0), (E, ValueError, r"groups must be >= 1")),
    ("NaN and Inf in x", with_(x=_nan_inf_x), "ok"),
    ("NaN and Inf in x, no relu", with_(x=_nan_inf_x, relu=False), "ok"),
    ("NaN in weight", with_(weight=lambda d: d["weight"].index_put((torch.tensor([3]),), torch.tensor(math.nan))),
     "ok"),
    ("Inf in residual", with_(residual=lambda d: d["residual"].index_put((torch.tensor([1]), torch.tensor([2])),
                                                                        torch.tensor(math.inf))), "ok"),
    ("NaN in residual", with_(residual=lambda d: d["residual"].index_put((torch.tensor([0]), torch.tensor([9])),
                                                                        torch.tensor(math.nan))), "ok"),
    ("NaN in scale", with_(scale=lambda d: d["scale"].index_put((torch.tensor([4]),), torch.tensor(math.nan))), "ok"),
    ("NaN in shift", with_(shift=lambda d: d["shift"].index_put((torch.tensor([7]),), torch.tensor(math.nan))), "ok"),
    ("empty batch", with_(x=lambda d: d["x"][:0], residual=lambda d: d["residual"][:0]), "ok"),
    ("non-contiguous x", with_(x=lambda d: torch.randn(2, 8, 6, 12)[..., ::2]), "ok"),
    ("overlapping-stride x", with_(x=_overlap_x), "ok"),
    ("expanded residual", with_(residual=lambda d: torch.randn(1, 16, 1, 6).expand(2, 16, 6, 6)), "ok"),
    ("as_strided residual", with_(residual=lambda d: torch.randn(200).as_strided((2, 16, 6, 6), (1, 7, 3, 2))),
     "ok"),
    ("residual is x", with_(weight=lambda d: torch.randn(8, 8, 3, 3) / 8, scale=torch.rand(8) + 0.5,
                            shift=torch.randn(8), residual=lambda d: d["x"]), "ok"),
    ("non-contiguous weight", with_(weight=lambda d: d["weight"].transpose(2, 3).contiguous().transpose(2, 3)), "ok"),
    ("expanded scale", with_(scale=lambda d: torch.tensor([1.5]).expand(16)), "ok"),
]
LAYOUTS = {"nchw": lambda t: t, "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last)
           if t.dim() == 4 and t.is_contiguous() and t.device.type != "meta" else t}


def _backend_params():
    return [b for b in ("torch", "triton") if b in backends.available_backends()] + ["auto"]


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name,kwargs,expect", FN_CASES, ids=[c[0] for c in FN_CASES])
def test_fused_conv_bn_act(name, kwargs, expect, layout, backend):
    d = dict(kwargs)
    if isinstance(d["x"], torch.Tensor):
        d["x"] = LAYOUTS[layout](d["x"])
    if expect != "ok":
        _, exc, pattern = expect
        with pytest.raises(exc, match=pattern):
            rk.fused_conv_bn_act(**d, backend=backend)
        return
    x = d["x"]
    if backend == "triton" and not backends.supports("triton", x, d["weight"], d.get("groups", 1))[0]:
        pytest.skip("triton cannot serve this call (covered by the refusal tests)")
    with torch.no_grad():
        y = rk.fused_conv_bn_act(**d, backend=backend)
    _check_result(y, fn_ref(d), x)


def test_named_backend_that_cannot_serve_names_the_rule():
    d = base()
    for backend in ("cuda", "triton"):
        ok, why = backends.supports(backend, d["x"].double(), d["weight"].double(), 1)
        if ok:
            continue
        with pytest.raises(rk.BackendUnavailable) as info:
            rk.fused_conv_bn_act(d["x"].double(), d["weight"].double(), d["scale"].double(), d["shift"].double(),
                                 None, padding=1, backend=backend)
        assert str(info.value) == why and backend in why
    with pytest.raises(ValueError, match=r"backend must be one of"):
        rk.fused_conv_bn_act(**base(), backend="cudnn")


# --- the functional training op -------------------------------------------------------------------------
def tbase():
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(2, 8, 6, 6, generator=g), weight=torch.randn(16, 8, 3, 3, generator=g) / 8,
                gamma=torch.rand(16, generator=g) + 0.5, beta=torch.randn(16, generator=g),
                residual=torch.randn(2, 16, 6, 6, generator=g), running_mean=torch.zeros(16),
                running_var=torch.ones(16), num_batches_tracked=torch.tensor(0), padding=1)


def twith(**kw):
    d = tbase()
    for key, v in kw.items():
        d[key] = v(d) if callable(v) else v
    return d


TRAIN_CASES = [
    ("x on another device", twith(x=lambda d: d["x"].to("meta")), (E, ValueError, r"weight must be on x's device")),
    ("gamma on another device", twith(gamma=lambda d: d["gamma"].to("meta")),
     (E, ValueError, r"gamma must be on x's device")),
    ("running_var on another device", twith(running_var=lambda d: d["running_var"].to("meta")),
     (E, ValueError, r"running_var must be on x's device")),
    ("x integer", twith(x=lambda d: d["x"].int()), (E, TypeError, r"x must be float32")),
    ("weight dtype", twith(weight=lambda d: d["weight"].double()), (E, TypeError, r"weight must have x's dtype")),
    ("gamma integer", twith(gamma=lambda d: d["gamma"].long()), (E, TypeError, r"gamma must be a floating-point")),
    ("x rank", twith(x=lambda d: d["x"][0]), (E, ValueError, r"x must be a 4-D tensor")),
    ("channel count", twith(x=lambda d: d["x"][:, :6]), (E, ValueError, r"x has C=6 channels")),
    ("gamma length", twith(gamma=lambda d: d["gamma"][:4]),
     (E, ValueError, r"gamma must be None or a 1-D tensor of the K=16")),
    ("running_mean length", twith(running_mean=torch.zeros(8)),
     (E, ValueError, r"running_mean must be a 1-D tensor of the K=16")),
    ("residual shape", twith(residual=lambda d: d["residual"][:, :8]),
     (E, ValueError, r"residual must have the output's shape")),
    ("one value per channel", twith(x=lambda d: d["x"][:1, :, :1, :1], padding=0, residual=None,
                                    weight=lambda d: d["weight"][:, :, :1, :1]),
     (E, ValueError, r"Expected more than 1 value per channel when training")),
    ("NaN and Inf in x", twith(x=_nan_inf_x), "ok"),
    ("empty batch", twith(x=lambda d: d["x"][:0], residual=lambda d: d["residual"][:0]), "ok"),
    ("overlapping-stride x", twith(x=_overlap_x), "ok"),
    ("expanded residual", twith(residual=lambda d: torch.randn(1, 16, 6, 1).expand(2, 16, 6, 6)), "ok"),
]


def _train_ref(d):
    """nn.BatchNorm2d in training mode, float64, with the same running buffers (copied)."""
    y = F.conv2d(d["x"].double(), d["weight"].double(), None, 1, d["padding"])
    rm, rv = d["running_mean"].double().clone(), d["running_var"].double().clone()
    if y.shape[0] * y.shape[2] * y.shape[3] > 0:
        y = F.batch_norm(y, rm, rv, d["gamma"].double(), d["beta"].double(), True, 0.1, 1e-5)
    if d["residual"] is not None:
        y = y + d["residual"].double()
    return y.relu(), rm, rv


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("name,kwargs,expect", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_fused_conv_bn_train(name, kwargs, expect, backend):
    d = {k: (v.clone() if isinstance(v, torch.Tensor) and v.device.type != "meta" else v) for k, v in kwargs.items()}
    if expect != "ok":
        _, exc, pattern = expect
        with pytest.raises(exc, match=pattern):
            rk.fused_conv_bn_train(**d, backend=backend)
        return
    ref, rm, rv = _train_ref(d)
    with torch.no_grad():
        y = rk.fused_conv_bn_train(**d, backend=backend)
    _check_result(y, ref, d["x"])
    assert int(d["num_batches_tracked"]) == 1
    _same_nonfinite(d["running_mean"], rm)
    _same_nonfinite(d["running_var"], rv)
    fin = torch.isfinite(rm) & torch.isfinite(rv)
    torch.testing.assert_close(d["running_mean"][fin].double(), rm[fin], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d["running_var"][fin].double(), rv[fin], rtol=1e-5, atol=1e-6)


# --- modules and convert --------------------------------------------------------------------------------
def _modules():
    torch.manual_seed(0)
    conv_bn = rk.FusedConvBNAct.from_modules(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                             nn.ReLU())
    basic, bottle = BasicBlock(8, 8), Bottleneck(8, 2)
    for m in (conv_bn, basic, bottle):
        randomize_bn(m)
    return {"FusedConvBNAct": (conv_bn, None),
            "FusedBasicBlock": (rk.FusedBasicBlock.from_block(copy.deepcopy(basic)), basic),
            "FusedBottleneck": (rk.FusedBottleneck.from_block(copy.deepcopy(bottle)), bottle)}


def _module_ref(name, fused, ref_mod, x, residual):
    if name == "FusedConvBNAct":
        ref = nn.Sequential(copy.deepcopy(fused.conv), copy.deepcopy(fused.bn)).double().train(fused.training)
        y = ref(x.double())
        y = y + residual.double() if residual is not None else y
        return y.relu()
    return copy.deepcopy(ref_mod).double().train(fused.training)(x.double())


def _x_nan(x):
    x = x.clone()
    x[0, 0, 1, 1], x[-1, 2, 3, 3] = float("nan"), float("inf")
    return x


MOD_CASES = [  # name, x maker (from a good [2, 8, 6, 6] x), residual maker, expect
    ("x on another device", lambda x: x.to("meta"), None, (E, ValueError, r"must be on x's device")),
    ("x dtype float64", lambda x: x.double(), None, (E, TypeError, r"weight must have x's dtype")),
    ("x integer", lambda x: x.long(), None, (E, TypeError, r"x must be float32")),
    # (training falls back to the unfused ops for non-4-D x: BatchNorm2d's own error, as the original block)
    ("x rank", lambda x: x[0], None, (E, ValueError, r"x must be a 4-D tensor|expected 4D input \(got 3D input\)")),
    ("channel count", lambda x: x[:, :5], None, (E, ValueError, r"x has C=5 channels")),
    ("too small", lambda x: x[:, :, :0], None, (E, ValueError, r"too small|spatial")),
    ("NaN and Inf in x", _x_nan, None, "ok"),
    ("NaN and Inf in channels_last x", lambda x: _x_nan(x).contiguous(memory_format=torch.channels_last), None, "ok"),
    ("empty batch", lambda x: x[:0], None, "ok"),
    ("non-contiguous x", lambda x: torch.cat([x, x], 3)[..., ::2], None, "ok"),
    ("overlapping-stride x", lambda x: x[:1].expand(2, 8, 6, 6), None, "ok"),
    ("channels_last x", lambda x: x.contiguous(memory_format=torch.channels_last), None, "ok"),
]
RES_CASES = [  # FusedConvBNAct's residual argument
    ("residual shape", lambda x: torch.randn(2, 16, 5, 6), (E, ValueError, r"residual must have the output's shape")),
    ("residual device", lambda x: torch.randn(2, 16, 6, 6, device="meta"),
     (E, ValueError, r"residual must be on x's device")),
    ("residual dtype", lambda x: torch.randn(2, 16, 6, 6).double(), (E, TypeError, r"residual must have x's dtype")),
    ("expanded residual", lambda x: torch.randn(1, 16, 1, 1).expand(2, 16, 6, 6), "ok"),
    ("Inf residual", lambda x: torch.full((2, 16, 6, 6), -math.inf), "ok"),
    ("NaN and +Inf residual", lambda x: torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(3))
     .index_put((torch.tensor([0, 1]), torch.tensor([2, 5]), torch.tensor([3, 0]), torch.tensor([1, 4])),
                torch.tensor([math.nan, math.inf])), "ok"),
]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("module", ["FusedConvBNAct", "FusedBasicBlock", "FusedBottleneck"])
@pytest.mark.parametrize("name,make_x,make_res,expect", MOD_CASES + [(n, lambda x: x, r, e) for n, r, e in RES_CASES],
                         ids=[c[0] for c in MOD_CASES] + [c[0] for c in RES_CASES])
def test_module_forward(name, make_x, make_res, expect, module, mode):
    if make_res is not None and module != "FusedConvBNAct":
        pytest.skip("only FusedConvBNAct takes a residual argument")
    fused, ref_mod = _modules()[module]
    fused.train(mode == "train")
    x = make_x(torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(2)))
    residual = make_res(x) if make_res is not None else None
    call = (lambda: fused(x, residual)) if module == "FusedConvBNAct" else (lambda: fused(x))
    if expect != "ok":
        _, exc, pattern = expect
        with pytest.raises(exc, match=pattern):
            call()
        return
    ref = _module_ref(module, fused, ref_mod, x, residual)
    with torch.no_grad():
        y = call()
    _check_result(y, ref, x)


CONVERT_CASES = [
    ("not a module", lambda: rk.convert("resnet18"), (TypeError, r"model must be an nn.Module")),
    ("unknown backend", lambda: rk.convert(BasicBlock(4, 4).eval(), backend="tensorrt"),
     (ValueError, r"backend must be one of")),
    ("filter not callable", lambda: rk.convert(BasicBlock(4, 4).eval(), filter=3), (TypeError, r"filter must be")),
]


@pytest.mark.parametrize("name,call,expect", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_convert_bad_arguments(name, call, expect):
    exc, pattern = expect
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("channels_last", [False, True])
def test_converted_model_bad_input_and_nan(channels_last):
    import torchvision
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    fast = rk.convert(copy.deepcopy(model), channels_last=channels_last)
    with pytest.raises(ValueError, match=r"x has C=1 channels"):
        fast(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor"):
        fast(torch.randn(3, 32, 32))
    with torch.no_grad():
        assert fast(torch.randn(0, 3, 32, 32)).shape == (0, 10)
        x = torch.randn(2, 3, 32, 32)
        x[1, 0, 5, 5] = float("nan")
        y, ref = fast(x), model(x)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()
    # +inf in the image: whatever eager makes of it (NaN from inf - inf in a convolution), the converted
    # model makes too; then a NaN written into a weight after the folded/prepacked weight was cached.
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        x[0, 1, 7, 7] = float("inf")
        y, ref = fast(x), model(x)
        assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
        assert not torch.isfinite(y[0]).all() and torch.isfinite(y[1]).all()
        x = torch.randn(2, 3, 32, 32)
        assert torch.isfinite(fast(x)).all()  # caches every plan with finite weights
        for m in (model, fast):
            dict(m.named_parameters())["layer3.1.conv2.weight"][5, 0, 1, 1] = float("nan")
        y, ref = fast(x), model(x)
    assert torch.isnan(ref).all() and torch.isnan(y).all()


class _PoisonInPlace(nn.Module):
    def forward(self, x):
        x[0, 1, 2, 2] = float("nan")  # an in-place write into the previous fused op's output
        return x


class _Log(nn.Module):
    def forward(self, x):
        return x.log()  # NaN where x < 0, -inf where x == 0 (after a ReLU: many)


@pytest.mark.parametrize("between", ["in-place NaN", "log"])
def test_converted_model_nan_made_between_fused_ops(between):
    """Inside a converted model's forward only tensors made by fused ops from checked inputs skip the
    per-call NaN/Inf check: a non-fused layer that makes a NaN/-inf out of finite values, new or in place
    (visible to the version counter: no_grad, not inference_mode), still gets exact positions."""
    g = torch.Generator().manual_seed(5)

    def chain():
        conv, bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        return [conv, randomize_bn(bn), nn.ReLU()]
    mid = _PoisonInPlace() if between == "in-place NaN" else _Log()
    model = nn.Sequential(*chain(), mid, *chain()).eval()
    fast = rk.convert(copy.deepcopy(model), backend="torch")
    assert sum(isinstance(m, rk.FusedConvBNAct) for m in fast.modules()) == 2
    x = torch.randn(2, 8, 6, 6, generator=g)
    with torch.no_grad():
        y, ref = fast(x), copy.deepcopy(model).double()(x.double())
    assert not torch.isfinite(ref).all()
    _same_nonfinite(y, ref)


# --- NaN/Inf through backward -----------------------------------------------------------------------------
def _grads(f, x, params):
    x = x.detach().clone().requires_grad_()
    y = f(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    return [x.grad] + [p.grad for p in params]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", _backend_params())
def test_nan_inf_gradients_land_where_the_reference_puts_them(backend, mode):
    """ReLU's backward passes the gradient where the output is NaN (torch's threshold_backward zeroes
    only out <= 0): the fused ops' backward must put NaN in dx, dW, dgamma exactly where autograd
    through the unfused modules does."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
    randomize_bn(bn)
    fused = rk.FusedConvBNAct.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU(), backend=backend)
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).double()
    fused.train(mode == "train"), ref.train(mode == "train")
    x = torch.randn(2, 4, 7, 7)
    x[0, 1, 3, 3] = float("nan")
    x[1, 2, 0, 6] = float("inf")
    if mode == "train":  # batch statistics would make every output NaN: keep the bad values in one image
        x[0, :, 0, 0] = float("nan")
    got = _grads(fused, x, [fused.conv.weight, fused.bn.weight, fused.bn.bias])
    want = _grads(ref, x.double(), [ref[0].weight, ref[1].weight, ref[1].bias])
    for name, g, w in zip(("x", "weight", "gamma", "beta"), got, want):
        assert g is not None and g.shape == w.shape, name
        for f in (torch.isnan, torch.isinf):
            assert torch.equal(f(g), f(w)), f"{name}.grad: {f.__name__} positions differ from autograd's"
        fin = torch.isfinite(w)
        torch.testing.assert_close(g.double()[fin], w[fin], rtol=1e-4, atol=1e-4, msg=f"{name}.grad")
