"""Chan's combine of per-tile BatchNorm statistics (resnet_kernels/_stats.py), on the CPU.

The Triton and CUDA training kernels report, per M tile, the channel sums, the sums of squared
deviations from the tile mean and the tile's row count; these tests build those partials in
float64 exactly as the kernels define them and check the combine against torch.var_mean.
"""
import pytest
import torch

from resnet_kernels._stats import affine_from_stats, chan_combine


def _partials(y, tile, tiles=None):
    """y: [M, K]. Partials of consecutive `tile`-row tiles; `tiles` > needed rows adds count-0 rows."""
    M, K = y.shape
    used = (M + tile - 1) // tile
    tiles = tiles or used
    psum = torch.zeros(tiles, K, dtype=y.dtype)
    pm2 = torch.zeros(tiles, K, dtype=y.dtype)
    pcnt = torch.zeros(tiles, dtype=y.dtype)
    for t in range(used):
        blk = y[t * tile:(t + 1) * tile]
        psum[t] = blk.sum(0)
        pm2[t] = (blk - blk.mean(0)).square().sum(0)
        pcnt[t] = blk.shape[0]
    return psum, pm2, pcnt


@pytest.mark.parametrize("M,tile,extra", [(1000, 128, 0), (1000, 64, 5), (7, 128, 0), (128, 128, 3), (129, 128, 0)])
def test_chan_combine_matches_var_mean(M, tile, extra):
    g = torch.Generator().manual_seed(M + tile)
    y = torch.randn(M, 24, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 24, dtype=torch.float64)
    y += torch.linspace(-50, 50, 24, dtype=torch.float64)
    psum, pm2, pcnt = _partials(y, tile, ((M + tile - 1) // tile) + extra)
    mean, var = chan_combine(psum, pm2, pcnt, M)
    ref_var, ref_mean = torch.var_mean(y, 0, unbiased=False)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-10, atol=1e-14)


def test_chan_combine_fp32_keeps_small_variance_under_large_mean():
    """fp32 partials of data with mean 1e4 and spread 1e-1: the naive E[y^2]-E[y]^2 in fp32 loses
    the variance entirely; the tile-wise combine keeps it to a few percent of fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    y64 = 1e4 + 0.1 * torch.randn(4096, 8, generator=g, dtype=torch.float64)
    y = y64.float()
    psum, pm2, pcnt = _partials(y, 128)
    mean, var = chan_combine(psum, pm2, pcnt, y.shape[0])
    ref_var, ref_mean = torch.var_mean(y.double(), 0, unbiased=False)
    assert ((var.double() - ref_var).abs() / ref_var).max() < 1e-2
    naive = (y.square().mean(0) - y.mean(0).square())
    assert ((naive.double() - ref_var).abs() / ref_var).max() > 0.5  # the failure the combine avoids


@pytest.mark.parametrize("affine", [True, False])
def test_affine_from_stats_is_batch_norm(affine):
    g = torch.Generator().manual_seed(3)
    y = torch.randn(2, 6, 5, 5, generator=g)
    var, mean = torch.var_mean(y, (0, 2, 3), unbiased=False)
    gamma = torch.randn(6, generator=g) if affine else None
    beta = torch.randn(6, generator=g) if affine else None
    a, b = affine_from_stats(mean, var, gamma, beta, 1e-5)
    want = torch.nn.functional.batch_norm(y, None, None, gamma, beta, True, 0.0, 1e-5)
    torch.testing.assert_close(y * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1), want, rtol=1e-5, atol=1e-5)
