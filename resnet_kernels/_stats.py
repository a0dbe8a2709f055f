"""Combining per-tile BatchNorm statistics (shared by the Triton and CUDA training kernels).

Each conv tile t reports, per output channel k, the sum of its valid rows psum[t, k], the sum of
squared deviations from its own mean pm2[t, k], and its row count pcnt[t]. Chan et al.'s
parallel-variance combine gives the batch mean and biased variance without the cancellation of
E[y^2] - E[y]^2 (a channel mean of 1e4 with unit spread would lose every digit in fp32).
"""
from __future__ import annotations

import torch


def chan_combine(psum: torch.Tensor, pm2: torch.Tensor, pcnt: torch.Tensor, M: int):
    """(mean [K], biased var [K]) in fp32 from tile partials psum/pm2 [T, K], pcnt [T].

    Tiles with count 0 (a tile grid larger than the one a kernel config used) contribute nothing.
    """
    cnt = pcnt[:, None]
    mean = psum.sum(0) / M
    tmean = torch.where(cnt > 0, psum / cnt.clamp_min(1.0), mean)
    var = (pm2.sum(0) + (cnt * (tmean - mean).square()).sum(0)) / M
    return mean, var


def affine_from_stats(mean, var, gamma, beta, eps):
    """Per-channel (a, b) with act(y * a + b + residual) == act((y - mean) * invstd * gamma + beta + residual)."""
    invstd = torch.rsqrt(var + eps)
    a = invstd if gamma is None else invstd * gamma.float()
    b = -mean * a if beta is None else beta.float() - mean * a
    return a, b
