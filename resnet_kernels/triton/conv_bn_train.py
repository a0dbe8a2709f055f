"""Triton training path: BatchNorm with batch statistics around the implicit-GEMM convolution.

Forward (three launches, one pass over the conv output):
  1. the implicit-GEMM kernel of conv_bn_act.py with STATS=True stores y = conv(x, W) and each
     M tile's per-channel sum and sum of squared deviations from the tile mean (fp32, from
     the accumulator, so there is no separate statistics pass over y);
  2. a tiny host-side combine over tiles (Chan's parallel variance) gives mean and biased var;
  3. one elementwise kernel: out = act((y - mean) * invstd * gamma + beta + residual).
Backward (two launches over y):
  1. one reduction: per-channel sum of gz and of gz * y_hat, gz = grad * (out > 0) under ReLU;
  2. one elementwise kernel: dy = gamma * invstd * (gz - sum(gz)/n - y_hat * sum(gz y_hat)/n),
     plus gz itself (the residual's gradient) under ReLU.
The convolution's own gradients come from aten.convolution_backward (ops.py).

All tensors are logical [N, K, P, Q] with arbitrary strides (dense channels_last is the fast
case); every elementwise/reduction kernel walks (pixel, channel) tiles like the conv epilogue.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._geometry import out_memory_format
from .._stats import affine_from_stats, chan_combine
from . import conv_bn_act as _conv

_EW_BLOCK_M = 64  # pixels per program of the elementwise / reduction kernels
_EW_BLOCK_N = 64  # channels per program
_MIN_CONV_BLOCK_M = min(c["BLOCK_M"] for c in _conv.CONFIGS)


@triton.jit
def _bn_apply_kernel(
    y_ptr,  # conv output, logical [N, K, P, Q]
    a_ptr,  # fp32 [K]: gamma * invstd
    b_ptr,  # fp32 [K]: beta - mean * gamma * invstd
    res_ptr,  # residual [N, K, P, Q] (dummy when HAS_RES is False)
    out_ptr,  # output [N, K, P, Q]
    M, K, P, Q,  # M = N * P * Q
    syn, syk, syp, syq,  # y strides
    srn, srk, srp, srq,  # residual strides
    son, sok, sop, soq,  # out strides
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < K
    mask = m_mask[:, None] & n_mask[None, :]
    m64 = offs_m.to(tl.int64)
    n_img = m64 // (P * Q)
    pq = m64 % (P * Q)
    p = pq // Q
    q = pq % Q
    k64 = offs_n.to(tl.int64)
    y = tl.load(y_ptr + (n_img * syn + p * syp + q * syq)[:, None] + (k64 * syk)[None, :], mask=mask, other=0.0)
    a = tl.load(a_ptr + offs_n, mask=n_mask, other=0.0)
    b = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0)
    v = y.to(tl.float32) * a[None, :] + b[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + (n_img * srn + p * srp + q * srq)[:, None] + (k64 * srk)[None, :], mask=mask,
                    other=0.0)
        v = v + r.to(tl.float32)
    if RELU:  # a compare, not tl.maximum (0 for NaN): NaN propagates as through torch.relu
        v = tl.where(v < 0.0, 0.0, v)
    tl.store(out_ptr + (n_img * son + p * sop + q * soq)[:, None] + (k64 * sok)[None, :],
             v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(g_ptr, out_ptr, y_ptr, mean_ptr, invstd_ptr, M, K, P, Q, sgn, sgk, sgp, sgq, son, sok, sop, soq,
              syn, syk, syp, syq, RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (pixel, channel) tile both backward kernels start from: its coordinates and masks,
    gz (grad through the ReLU, fp32) and y_hat = (y - mean) * invstd (fp32)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < K
    mask = m_mask[:, None] & n_mask[None, :]
    m64 = offs_m.to(tl.int64)
    n_img = m64 // (P * Q)
    pq = m64 % (P * Q)
    p = pq // Q
    q = pq % Q
    k64 = offs_n.to(tl.int64)
    g = tl.load(g_ptr + (n_img * sgn + p * sgp + q * sgq)[:, None] + (k64 * sgk)[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if RELU:
        o = tl.load(out_ptr + (n_img * son + p * sop + q * soq)[:, None] + (k64 * sok)[None, :], mask=mask,
                    other=0.0)
        g = tl.where(o <= 0, 0.0, g)  # torch.relu's backward: a NaN output passes its grad
    y = tl.load(y_ptr + (n_img * syn + p * syp + q * syq)[:, None] + (k64 * syk)[None, :], mask=mask,
                other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + offs_n, mask=n_mask, other=0.0)
    invstd = tl.load(invstd_ptr + offs_n, mask=n_mask, other=0.0)
    return offs_n, n_mask, mask, n_img, p, q, k64, g, (y - mean[None, :]) * invstd[None, :]


@triton.jit
def _bn_bwd_reduce_kernel(
    g_ptr,  # grad of out [N, K, P, Q]
    out_ptr,  # forward output (ReLU mask); dummy when RELU is False
    y_ptr,  # conv output
    mean_ptr,  # fp32 [K]
    invstd_ptr,  # fp32 [K]
    psum_ptr,  # fp32 [tiles_m, K]: partial sum of gz
    psumy_ptr,  # fp32 [tiles_m, K]: partial sum of gz * y_hat
    M, K, P, Q,
    sgn, sgk, sgp, sgq,  # grad strides
    son, sok, sop, soq,  # out strides
    syn, syk, syp, syq,  # y strides
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_n, n_mask, mask, n_img, p, q, k64, g, yhat = _bwd_tile(
        g_ptr, out_ptr, y_ptr, mean_ptr, invstd_ptr, M, K, P, Q, sgn, sgk, sgp, sgq, son, sok, sop, soq,
        syn, syk, syp, syq, RELU, BLOCK_M, BLOCK_N)
    yhat = tl.where(mask, yhat, 0.0)
    tl.store(psum_ptr + pid_m.to(tl.int64) * K + offs_n, tl.sum(g, axis=0), mask=n_mask)
    tl.store(psumy_ptr + pid_m.to(tl.int64) * K + offs_n, tl.sum(g * yhat, axis=0), mask=n_mask)


@triton.jit
def _bn_bwd_apply_kernel(
    g_ptr, out_ptr, y_ptr,  # as in the reduction
    mean_ptr, invstd_ptr,  # fp32 [K]
    a_ptr,  # fp32 [K]: gamma * invstd
    c1_ptr,  # fp32 [K]: sum(gz) / n
    c2_ptr,  # fp32 [K]: sum(gz * y_hat) / n
    dy_ptr,  # out: grad of y, x's dtype, [N, K, P, Q]
    gz_ptr,  # out (RELU only): gz, the residual's gradient
    M, K, P, Q,
    sgn, sgk, sgp, sgq,
    son, sok, sop, soq,
    syn, syk, syp, syq,
    sdn, sdk, sdp, sdq,  # dy strides (gz has the same)
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n, n_mask, mask, n_img, p, q, k64, g, yhat = _bwd_tile(
        g_ptr, out_ptr, y_ptr, mean_ptr, invstd_ptr, M, K, P, Q, sgn, sgk, sgp, sgq, son, sok, sop, soq,
        syn, syk, syp, syq, RELU, BLOCK_M, BLOCK_N)
    a = tl.load(a_ptr + offs_n, mask=n_mask, other=0.0)
    c1 = tl.load(c1_ptr + offs_n, mask=n_mask, other=0.0)
    c2 = tl.load(c2_ptr + offs_n, mask=n_mask, other=0.0)
    dy = (g - c1[None, :] - yhat * c2[None, :]) * a[None, :]
    d_off = (n_img * sdn + p * sdp + q * sdq)[:, None] + (k64 * sdk)[None, :]
    tl.store(dy_ptr + d_off, dy.to(dy_ptr.dtype.element_ty), mask=mask)
    if RELU:
        tl.store(gz_ptr + d_off, g.to(gz_ptr.dtype.element_ty), mask=mask)


def _fmt(x):
    return out_memory_format(x)  # the rule the fake kernels use


def _grid(M, K):
    return (triton.cdiv(M, _EW_BLOCK_M), triton.cdiv(K, _EW_BLOCK_N))


def conv_bn_train(x, weight, gamma, beta, residual, stride, padding, dilation, eps, relu, config=None):
    """(out, y, mean, var) like reference.conv_bn_train, on Triton kernels. config: force one
    conv tile config (tests); default autotuned on GPU, CONFIGS[0] under the interpreter."""
    N, _, H, W = x.shape
    K = weight.shape[0]
    fmt = _fmt(x)
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    P = (H + 2 * ph - dh * (weight.shape[2] - 1) - 1) // sh + 1
    Q = (W + 2 * pw - dw * (weight.shape[3] - 1) - 1) // sw + 1
    M = N * P * Q
    tiles = triton.cdiv(M, _MIN_CONV_BLOCK_M)
    psum = torch.zeros((tiles, K), dtype=torch.float32, device=x.device)
    pm2 = torch.zeros((tiles, K), dtype=torch.float32, device=x.device)
    pcnt = torch.zeros((tiles,), dtype=torch.float32, device=x.device)
    dummy = torch.empty(K, dtype=torch.float32, device=x.device)
    y = torch.empty((N, K, P, Q), dtype=x.dtype, device=x.device, memory_format=fmt)
    _conv.conv_bn_act(x, weight, dummy, dummy, None, stride, padding, dilation, False, config=config, out=y,
                      stats=(psum, pm2, pcnt))
    # Chan's combine over tiles (tiles a config did not use have count 0 and contribute nothing).
    mean, var = chan_combine(psum, pm2, pcnt, M)
    a, b = affine_from_stats(mean, var, gamma, beta, eps)
    out = torch.empty_like(y)
    res = residual if residual is not None else y
    _bn_apply_kernel[_grid(M, K)](
        y, a.contiguous(), b.contiguous(), res, out, M, K, P, Q,
        *y.stride(), *(res.stride() if residual is not None else (0, 0, 0, 0)), *out.stride(),
        HAS_RES=residual is not None, RELU=bool(relu), BLOCK_M=_EW_BLOCK_M, BLOCK_N=_EW_BLOCK_N)
    return out, y, mean, var


def bn_act_train_backward(grad, out, y, mean, var, gamma, eps, relu):
    """(dy, gz, dgamma, dbeta) like reference.bn_act_train_backward, on Triton kernels."""
    N, K, P, Q = y.shape
    M = N * P * Q
    fmt = _fmt(y)
    invstd = torch.rsqrt(var + eps).contiguous()
    mean = mean.contiguous()
    grid = _grid(M, K)
    psum = torch.empty((grid[0], K), dtype=torch.float32, device=y.device)
    psumy = torch.empty((grid[0], K), dtype=torch.float32, device=y.device)
    o = out if relu else y
    _bn_bwd_reduce_kernel[grid](
        grad, o, y, mean, invstd, psum, psumy, M, K, P, Q, *grad.stride(), *o.stride(), *y.stride(),
        RELU=bool(relu), BLOCK_M=_EW_BLOCK_M, BLOCK_N=_EW_BLOCK_N)
    dbeta = psum.sum(0)
    dgamma = psumy.sum(0)
    a = invstd if gamma is None else invstd * gamma.float()
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=fmt)
    gz = torch.empty(y.shape, dtype=grad.dtype, device=y.device, memory_format=fmt) if relu else grad.new_empty(0)
    _bn_bwd_apply_kernel[grid](
        grad, o, y, mean, invstd, a.contiguous(), (dbeta / M).contiguous(), (dgamma / M).contiguous(), dy,
        gz if relu else dy, M, K, P, Q, *grad.stride(), *o.stride(), *y.stride(), *dy.stride(),
        RELU=bool(relu), BLOCK_M=_EW_BLOCK_M, BLOCK_N=_EW_BLOCK_N)
    return dy, gz, dgamma, dbeta
