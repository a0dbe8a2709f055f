"""Test setup: Triton's interpreter on CPU-only machines, offline hubs, shared numeric helpers."""
import os

# Must happen before triton (or resnet_kernels, which imports it lazily) is imported anywhere.
if os.environ.get("RESNET_KERNELS_TEST_GPU_TRITON") != "1":
    try:
        import torch as _t
        _has_gpu = _t.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_gpu = False
    if not _has_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# auto's measured choices go to a throw-away folder, never the user's ~/.cache/resnet_kernels.
if "RESNET_KERNELS_CACHE_DIR" not in os.environ:
    import atexit as _atexit
    import shutil as _shutil
    import tempfile as _tempfile

    os.environ["RESNET_KERNELS_CACHE_DIR"] = _tempfile.mkdtemp(prefix="resnet_kernels_test_cache_")
    _atexit.register(_shutil.rmtree, os.environ["RESNET_KERNELS_CACHE_DIR"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# Floors of the tolerance rule in shared/cases/FIELD_CASES.md.
FLOOR = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def err(y, ref):
    """max|y - ref| / (max|ref| + 1e-6), computed in float64."""
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    return ((y - ref).abs().max() / (ref.abs().max() + 1e-6)).item()


def assert_matches(y, ref64, unfused=None, dtype=None, factor=2.0, floor=None):
    """The fused result is within `factor` x PyTorch's own unfused error in that dtype, or the floor."""
    dtype = dtype or y.dtype
    assert torch.isfinite(y).all() or not torch.isfinite(ref64).all(), "non-finite values where ref64 is finite"
    bound = FLOOR[dtype] if floor is None else floor
    if unfused is not None:
        bound = max(bound, factor * err(unfused, ref64))
    e = err(y, ref64)
    assert e <= bound, f"ERR={e:.3g} > bound {bound:.3g} (unfused ERR={err(unfused, ref64) if unfused is not None else 'n/a'})"
    return e


def randomize_bn(module, seed=0, gamma=(-1.0, 1.5)):
    """Realistic, non-trivial BN statistics (never zeros), including negative gammas."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            k = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(k, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(k, generator=g) * 1.5 + 0.25)
            if m.affine:
                m.weight.data.copy_(torch.rand(k, generator=g) * (gamma[1] - gamma[0]) + gamma[0])
                m.bias.data.copy_(torch.randn(k, generator=g) * 0.3)
    return module


@pytest.fixture
def photo():
    """A real photo (scikit-image's chelsea), ImageNet-normalised, [1, 3, H, W] float32."""
    return real_photo()


def real_photo(size=64, which="chelsea"):
    import skimage.data
    img = getattr(skimage.data, which)()
    t = torch.from_numpy(img).permute(2, 0, 1).float().div(255).unsqueeze(0)
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((t - mean) / std).contiguous()


def triton_available():
    import resnet_kernels as rk
    return "triton" in rk.available_backends()
