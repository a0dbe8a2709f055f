"""Fused conv2d + folded BatchNorm + optional residual + optional ReLU (Triton).

The op, per output channel ``k``::

    y[n, k, p, q] = act(conv2d(x, W)[n, k, p, q] * scale[k] + shift[k] + residual[n, k, p, q])

with ``act`` = ReLU or identity.  ``scale``/``shift`` are the BatchNorm affine
parameters folded with the running statistics (fp32).

Implementation: an implicit GEMM in NHWC style.

* GEMM M = N*P*Q (output pixels), GEMM N = K (output channels),
  GEMM K = R*S*C, reduced in the order (r, s, c) with c innermost, so that for a
  channels_last input consecutive reduction indices are consecutive addresses.
* The activation tensor is never copied: the kernel receives the real element
  strides of ``x``, ``residual`` and ``out``, so NCHW, channels_last and strided
  views all work; channels_last is the fast (coalesced) path.
* The weight is re-arranged once per call into a dense ``[R*S*C, K]`` matrix in
  the same (r, s, c) order, so each B tile is contiguous along output channels.
* Accumulation is always fp32; the epilogue (scale, shift, residual, ReLU) runs
  in fp32 and the result is rounded once to the output dtype.

Two reduction loop shapes exist (chosen by a heuristic, both fully masked):

* nested (``FLAT_K=False``): loop over the R*S filter taps, then over channel
  blocks.  Input coordinates are computed once per tap; used when ``C`` is a
  multiple of ``BLOCK_K`` (the common ResNet case: C = 64, 128, 256, 512).
* flat (``FLAT_K=True``): one loop over GEMM-K in ``BLOCK_K`` steps, decoding
  (r, s, c) per element.  Avoids padding every tap up to ``BLOCK_K`` when C is
  small or ragged (the 7x7 stem with C=3 has GEMM-K = 147: 3 steps of 64
  instead of 49).

Precision rule for fp32 inputs (``input_precision`` of ``tl.dot``):
TF32 is used only if ALL of these hold: ``x`` is a CUDA tensor, the Triton
interpreter is not active, ``torch.backends.cudnn.allow_tf32`` is True and
``torch.backends.cuda.matmul.allow_tf32`` is True.  Otherwise IEEE fp32 is used.
(The default torch settings therefore give IEEE.)  When torch refuses to read a
legacy flag because the newer ``fp32_precision`` API was used, that flag is
taken from the new API instead (``"tf32"`` = allowed, ``"none"`` = inherit).  fp16/bf16 inputs always use
their native tensor-core path with fp32 accumulation.

Running on CPU requires the Triton interpreter: ``TRITON_INTERPRET=1`` must be
set before ``triton`` is first imported.  Under the interpreter the autotuner is
never used (it has no timer); the kernel is launched with ``config`` (default
``CONFIGS[0]``), and dot operands of 16-bit dtypes are upcast to fp32 because
the interpreter's bf16 ``tl.dot`` is wrong.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

__all__ = [
    "CONFIGS",
    "conv_bn_act",
    "supports",
    "output_channels_last",
    "is_interpreter",
]

# Tile configurations for GPUs.  Sized for ResNet layers: large-M early layers
# (56x56 / 28x28 spatial, 64-128 channels) favour BLOCK_M 128-256, the late
# layers (7x7 / 14x14, 256-512 channels) favour smaller M tiles and wider N.
# CONFIGS[0] is also the interpreter default: big tiles keep the number of
# interpreted programs (the interpreter's main cost) low.
CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
]

_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2**31 - 1


def is_interpreter() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------- #
# Kernel
# --------------------------------------------------------------------------- #


@triton.jit
def _conv_bn_act_kernel(
    x_ptr,  # input activations, logical [N, C, H, W], arbitrary strides
    w_ptr,  # weight as dense [R*S*C, K], row = (r*S + s)*C + c
    scale_ptr,  # fp32 [K], folded BN multiplier
    shift_ptr,  # fp32 [K], folded BN bias
    res_ptr,  # residual, logical [N, K, P, Q]; dummy when HAS_RES is False
    out_ptr,  # output, logical [N, K, P, Q], arbitrary strides
    M,  # N*P*Q, GEMM rows
    K,  # output channels, GEMM columns
    C,  # input channels
    H,  # input height
    W,  # input width
    P,  # output height
    Q,  # output width
    GEMM_K,  # R*S*C, reduction length
    stride_h,  # conv stride along H
    stride_w,  # conv stride along W
    pad_h,  # zero padding along H
    pad_w,  # zero padding along W
    dil_h,  # dilation along H
    dil_w,  # dilation along W
    sxn, sxc, sxh, sxw,  # x element strides (n, c, h, w)
    srn, srk, srp, srq,  # residual element strides (n, k, p, q); 0 if no residual
    son, sok, sop, soq,  # out element strides (n, k, p, q)
    M_BUCKET,  # power-of-two bucket of M; only read by the autotuner key
    psum_ptr,  # STATS: fp32 [tiles_m, K] per-tile sum of the conv output; dummy otherwise
    pm2_ptr,  # STATS: fp32 [tiles_m, K] per-tile sum of squared deviations from the tile mean
    pcnt_ptr,  # STATS: fp32 [tiles_m] valid rows of each M tile
    R: tl.constexpr,  # filter height
    S: tl.constexpr,  # filter width
    HAS_RES: tl.constexpr,  # add residual before the activation
    RELU: tl.constexpr,  # apply ReLU (else identity)
    DOT_FP32: tl.constexpr,  # upcast dot operands (interpreter bf16 dot is broken)
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32", only matters for fp32 operands
    IDX64: tl.constexpr,  # per-image / weight offsets may exceed int32
    FLAT_K: tl.constexpr,  # single flattened GEMM-K loop (ragged/small C)
    STATS: tl.constexpr,  # training: store the raw conv output and per-tile channel statistics
    BLOCK_M: tl.constexpr,  # output pixels per program
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # reduction slice per step
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    # Channel tiles of one pixel tile are adjacent in launch order so they share
    # the activation tile in L2; the weight is small and stays resident anyway.
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < K

    PQ = P * Q
    n_img = offs_m // PQ
    pq = offs_m % PQ
    oh = pq // Q
    ow = pq % Q
    # Batch offset in int64: n * stride_n overflows int32 for large batches.
    x_rows = x_ptr + n_img.to(tl.int64) * sxn
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if FLAT_K:
        for k0 in range(0, GEMM_K, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < GEMM_K
            c = kk % C
            rs = kk // C
            r = rs // S
            s = rs % S
            ih = ih0[:, None] + (r * dil_h)[None, :]
            iw = iw0[:, None] + (s * dil_w)[None, :]
            if IDX64:
                ih = ih.to(tl.int64)
                iw = iw.to(tl.int64)
                c = c.to(tl.int64)
                kk = kk.to(tl.int64)
            a_mask = (
                m_mask[:, None]
                & k_mask[None, :]
                & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            )
            a_ptrs = x_rows[:, None] + (ih * sxh + iw * sxw + c[None, :] * sxc)
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b_ptrs = w_ptr + kk[:, None] * K + offs_n[None, :]
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        for rs in range(0, R * S):
            r = rs // S
            s = rs % S
            ih = ih0 + r * dil_h
            iw = iw0 + s * dil_w
            if IDX64:
                ih = ih.to(tl.int64)
                iw = iw.to(tl.int64)
            pix_mask = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_rows = x_rows + (ih * sxh + iw * sxw)
            w_row0 = rs * C
            for c0 in range(0, C, BLOCK_K):
                cc = c0 + offs_k
                c_mask = cc < C
                kk = w_row0 + cc
                if IDX64:
                    cc = cc.to(tl.int64)
                    kk = kk.to(tl.int64)
                a = tl.load(
                    a_rows[:, None] + cc[None, :] * sxc,
                    mask=pix_mask[:, None] & c_mask[None, :],
                    other=0.0,
                )
                b = tl.load(
                    w_ptr + kk[:, None] * K + offs_n[None, :],
                    mask=c_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                if DOT_FP32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    n64 = n_img.to(tl.int64)
    oh64 = oh.to(tl.int64)
    ow64 = ow.to(tl.int64)
    k64 = offs_n.to(tl.int64)
    mn_mask = m_mask[:, None] & n_mask[None, :]
    if STATS:
        # Batch statistics from the fp32 accumulator, no extra pass over y: the tile's per-channel
        # sum and its sum of squared deviations from the tile mean (Chan et al. combine the tiles
        # on the host; deviations, not raw squares, so a large mean cannot cancel the variance).
        # Plain stores, one slot per tile: deterministic, and safe under autotuning reruns.
        # The statistics are those of y as stored (rounded to the output dtype), like BatchNorm on
        # the eager conv's output: normalising stored values with statistics of unrounded ones is
        # off by the rounding / std for a channel whose spread is small next to its mean.
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        acc_r = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        accm = tl.where(mn_mask, acc_r, 0.0)
        tsum = tl.sum(accm, axis=0)
        dev = tl.where(mn_mask, acc_r - (tsum / cnt)[None, :], 0.0)
        tm2 = tl.sum(dev * dev, axis=0)
        tl.store(psum_ptr + pid_m.to(tl.int64) * K + offs_n, tsum, mask=n_mask)
        tl.store(pm2_ptr + pid_m.to(tl.int64) * K + offs_n, tm2, mask=n_mask)
        tl.store(pcnt_ptr + pid_m, cnt, mask=pid_n == 0)
        y = acc
    else:
        # Epilogue entirely in fp32; one rounding to the output dtype at the store.
        scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
        shift = tl.load(shift_ptr + offs_n, mask=n_mask, other=0.0)
        y = acc * scale[None, :] + shift[None, :]
    if HAS_RES:
        r_off = (n64 * srn + oh64 * srp + ow64 * srq)[:, None] + (k64 * srk)[None, :]
        res = tl.load(res_ptr + r_off, mask=mn_mask, other=0.0)
        y = y + res.to(tl.float32)
    if RELU:
        # A compare, not tl.maximum (which returns 0 for NaN): NaN propagates as through torch.relu.
        y = tl.where(y < 0.0, 0.0, y)
    o_off = (n64 * son + oh64 * sop + ow64 * soq)[:, None] + (k64 * sok)[None, :]
    tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=mn_mask)


def _use_flat_k(args) -> bool:
    # The nested loop wastes lanes whenever C is not a multiple of BLOCK_K
    # (worst case: the C=3 stem); the flat loop has no per-tap padding.
    return args["C"] % args["BLOCK_K"] != 0


_conv_bn_act_heur = triton.heuristics({"FLAT_K": _use_flat_k})(_conv_bn_act_kernel)

_AUTOTUNE_KEY = ["M_BUCKET", "K", "C", "R", "S", "stride_h", "stride_w"]


@functools.lru_cache(maxsize=1)
def _autotuned_kernel():
    """Autotuned launcher over the same jit kernel (GPU only, built on first use).

    Tensor dtypes are part of the autotuner cache key automatically, so fp32,
    fp16 and bf16 tune separately.
    """
    configs = [
        triton.Config(
            {"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"]},
            num_warps=c["num_warps"],
            num_stages=c["num_stages"],
        )
        for c in CONFIGS
    ]
    return triton.autotune(configs=configs, key=_AUTOTUNE_KEY)(_conv_bn_act_heur)


# --------------------------------------------------------------------------- #
# Host-side helpers
# --------------------------------------------------------------------------- #

IntPair = Union[int, Sequence[int]]


def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a 2-tuple of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a 2-tuple of ints, got {value!r}") from None
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a 2-tuple of ints, got {value!r}")
    return items  # type: ignore[return-value]


def output_channels_last(x: torch.Tensor) -> bool:
    """Whether the output should be channels_last to follow ``x``'s layout.

    * dense channels_last and not dense NCHW -> channels_last;
    * dense NCHW and not dense channels_last -> NCHW;
    * dense in both (only when C == 1 or H == W == 1) -> decided by strides:
      C == 1: channels_last iff the channel stride is 1 (NCHW gives H*W);
      H == W == 1: channels_last iff the W stride is not 1 (channels_last gives C);
    * not dense in either (strided views): channels_last iff the channel
      stride is 1 and C > 1, i.e. a view of a channels_last tensor.
    """
    _, C, H, W = x.shape
    _, sc, _, sw = x.stride()
    nchw = x.is_contiguous()
    cl = x.is_contiguous(memory_format=torch.channels_last)
    if cl and not nchw:
        return True
    if nchw and not cl:
        return False
    if nchw and cl:
        if C == 1:
            return sc == 1 and H * W > 1
        return sw != 1
    return sc == 1 and C > 1


def _precision_says_tf32(*levels: str) -> bool:
    """Resolve torch's fp32_precision chain: the first level that is not
    "none" wins (e.g. cudnn.conv -> cudnn -> global)."""
    for level in levels:
        if level and level != "none":
            return level == "tf32"
    return False


def _read_tf32_flag(legacy, new_levels) -> bool:
    with warnings.catch_warnings():
        # Newer torch warns about the legacy allow_tf32 flags; we only read them.
        warnings.simplefilter("ignore")
        try:
            return bool(legacy())
        except RuntimeError:
            # Raised by torch >= 2.9 once the new fp32_precision API was used:
            # the legacy getter refuses to answer, so read the new one.
            try:
                return _precision_says_tf32(*new_levels())
            except Exception:
                return False


def _tf32_allowed(x: torch.Tensor) -> bool:
    """TF32 only on CUDA, not interpreting, and both cudnn and matmul allow it."""
    if not x.is_cuda or is_interpreter():
        return False
    backends = torch.backends
    cudnn_ok = _read_tf32_flag(
        lambda: backends.cudnn.allow_tf32,
        lambda: (
            backends.cudnn.conv.fp32_precision,
            backends.cudnn.fp32_precision,
            backends.fp32_precision,
        ),
    )
    matmul_ok = _read_tf32_flag(
        lambda: backends.cuda.matmul.allow_tf32,
        lambda: (backends.cuda.matmul.fp32_precision, backends.fp32_precision),
    )
    return cudnn_ok and matmul_ok


def _check_config(config) -> dict:
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict with keys {_CONFIG_KEYS}, got {type(config).__name__}")
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"config is missing keys {missing}; required keys are {_CONFIG_KEYS}")
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = config[k]
        if not isinstance(v, int) or v < 16 or (v & (v - 1)) != 0:
            raise ValueError(f"config[{k!r}] must be a power of two >= 16 (tl.dot minimum), got {v!r}")
    for k in ("num_warps", "num_stages"):
        v = config[k]
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"config[{k!r}] must be a positive int, got {v!r}")
    return config


def _max_offset(t: torch.Tensor, dims: Sequence[int]) -> int:
    return sum((t.shape[d] - 1) * t.stride(d) for d in dims if t.shape[d] > 0)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def supports(
    x: torch.Tensor,
    weight: torch.Tensor,
    groups: int = 1,
    residual: Optional[torch.Tensor] = None,
    stride: IntPair = (1, 1),
    padding: IntPair = (0, 0),
    dilation: IntPair = (1, 1),
) -> Tuple[bool, str]:
    """Can :func:`conv_bn_act` run this convolution?  Returns ``(ok, reason)``.

    ``reason`` is ``"ok"`` when supported, otherwise a short explanation a
    dispatcher can log before falling back to another implementation.
    Checked: tensors, 4-D shapes, groups == 1, dtype fp32/fp16/bf16 (weight and
    residual matching x), one device, the device is CUDA (or any device under
    the Triton interpreter), valid stride/padding/dilation and a non-empty
    output size, and a matching residual shape.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return False, "x and weight must be torch.Tensor"
    if x.dim() != 4:
        return False, f"x must be 4-D [N, C, H, W], got {x.dim()}-D"
    if weight.dim() != 4:
        return False, f"weight must be 4-D [K, C, R, S], got {weight.dim()}-D"
    if groups != 1:
        return False, f"groups must be 1 (grouped/depthwise conv is not supported), got groups={groups}"
    if weight.shape[1] != x.shape[1]:
        return False, (
            f"weight.shape[1]={weight.shape[1]} must equal x.shape[1]={x.shape[1]} (groups must be 1)"
        )
    if x.dtype not in _SUPPORTED_DTYPES:
        return False, f"x dtype must be float32/float16/bfloat16, got {x.dtype}"
    if weight.dtype != x.dtype:
        return False, f"weight dtype {weight.dtype} must match x dtype {x.dtype}"
    if weight.device != x.device:
        return False, f"weight device {weight.device} must match x device {x.device}"
    if x.device.type != "cuda" and not is_interpreter():
        return False, f"x is on {x.device}; needs a CUDA device (or TRITON_INTERPRET=1)"
    try:
        sh, sw = _pair(stride, "stride")
        ph, pw = _pair(padding, "padding")
        dh, dw = _pair(dilation, "dilation")
    except TypeError as e:
        return False, str(e)
    if sh < 1 or sw < 1 or dh < 1 or dw < 1 or ph < 0 or pw < 0:
        return False, "stride and dilation must be >= 1 and padding >= 0"
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    P = (H + 2 * ph - dh * (R - 1) - 1) // sh + 1
    Q = (W + 2 * pw - dw * (S - 1) - 1) // sw + 1
    if P < 1 or Q < 1:
        return False, f"output size P x Q = {P} x {Q} is empty"
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            return False, "residual must be a torch.Tensor or None"
        if tuple(residual.shape) != (N, K, P, Q):
            return False, f"residual shape {tuple(residual.shape)} must be [N, K, P, Q]={[N, K, P, Q]}"
        if residual.dtype != x.dtype and not (x.dtype != torch.float32 and residual.dtype == torch.float32):
            return False, f"residual dtype {residual.dtype} must match x dtype {x.dtype} (or be float32)"
        if residual.device != x.device:
            return False, f"residual device {residual.device} must match x device {x.device}"
    return True, "ok"


# --------------------------------------------------------------------------- #
# Public entry point
# --------------------------------------------------------------------------- #


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: Optional[torch.Tensor] = None,
    stride: IntPair = (1, 1),
    padding: IntPair = (0, 0),
    dilation: IntPair = (1, 1),
    relu: bool = True,
    *,
    config: Optional[dict] = None,
    out: Optional[torch.Tensor] = None,
    stats: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """``act(conv2d(x, weight) * scale[k] + shift[k] + residual)`` in one kernel.

    ``stats`` (training, see ``conv_bn_train.py``): zero-initialised fp32 buffers
    ``(psum [T, K], pm2 [T, K], pcnt [T])`` with ``T >= cdiv(M, smallest BLOCK_M)``;
    the kernel then stores the raw convolution (scale/shift/residual/relu are
    not applied) and each M tile's channel sums and squared deviations.

    Args:
        x: ``[N, C, H, W]`` fp32/fp16/bf16, any strides (channels_last is fastest).
        weight: ``[K, C, R, S]``, same dtype/device as ``x``; groups must be 1.
        scale, shift: fp32 ``[K]`` (BatchNorm folded into an affine map).
        residual: ``None`` or ``[N, K, P, Q]`` with x's dtype, any strides.
        stride, padding, dilation: int or 2-tuple (per-dim values may differ);
            padding is zero padding.
        relu: apply ReLU after the residual add (otherwise identity).
        config: force one tile config (dict with the keys of ``CONFIGS``
            entries) instead of autotuning.  Under the interpreter the default
            is ``CONFIGS[0]``.
        out: optional preallocated ``[N, K, P, Q]`` output with x's dtype and
            device, any strides; must not share memory with the inputs.

    Returns:
        ``[N, K, P, Q]`` with x's dtype; channels_last when ``x`` is (see
        :func:`output_channels_last`), else contiguous NCHW.  Returns ``out``
        if given.

    fp32 precision: TF32 only when x is on CUDA, not interpreting, and both
    ``torch.backends.cudnn.allow_tf32`` and ``torch.backends.cuda.matmul.allow_tf32``
    are True; IEEE fp32 otherwise.
    """
    # ---- argument checks -------------------------------------------------- #
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [K, C, R, S], got shape {tuple(weight.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype must match x dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if x.device.type != "cuda" and not is_interpreter():
        raise ValueError(
            f"x is on {x.device}: the Triton kernel needs a CUDA tensor, or TRITON_INTERPRET=1 "
            "set before triton is imported to run on CPU"
        )

    N, C, H, W = x.shape
    K, Cw, R, S = weight.shape
    if Cw != C:
        if Cw > 0 and C % Cw == 0:
            raise ValueError(
                f"groups must be 1: weight.shape[1]={Cw} vs x.shape[1]={C} implies groups={C // Cw}; "
                "route grouped/depthwise convolutions to another implementation"
            )
        raise ValueError(
            f"weight.shape[1] must equal x.shape[1]={C} (groups must be 1), got weight shape {tuple(weight.shape)}"
        )

    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    if sh < 1 or sw < 1:
        raise ValueError(f"stride must be >= 1 in both dims, got {(sh, sw)}")
    if dh < 1 or dw < 1:
        raise ValueError(f"dilation must be >= 1 in both dims, got {(dh, dw)}")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be >= 0 in both dims, got {(ph, pw)}")
    P = (H + 2 * ph - dh * (R - 1) - 1) // sh + 1
    Q = (W + 2 * pw - dw * (S - 1) - 1) // sw + 1
    if P < 1 or Q < 1:
        raise ValueError(
            f"output spatial size must be >= 1, got P x Q = {P} x {Q} for input {H}x{W}, "
            f"kernel {R}x{S}, stride {(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}"
        )

    for name, t in (("scale", scale), ("shift", shift)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a float32 tensor of shape [K]=[{K}], got {type(t).__name__}")
        if t.dtype != torch.float32 or tuple(t.shape) != (K,):
            raise ValueError(
                f"{name} must be float32 of shape [K]=[{K}], got {t.dtype} of shape {list(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")

    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if tuple(residual.shape) != (N, K, P, Q):
            raise ValueError(
                f"residual must have shape [N, K, P, Q]={[N, K, P, Q]}, got {list(residual.shape)}"
            )
        if residual.dtype != x.dtype and not (x.dtype != torch.float32 and residual.dtype == torch.float32):
            # a float32 residual with fp16/bf16 x is read as fp32 (the epilogue adds in fp32)
            raise TypeError(f"residual dtype must match x dtype {x.dtype} (or be float32), got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual must be on x's device {x.device}, got {residual.device}")

    if config is not None:
        config = _check_config(config)

    channels_last = output_channels_last(x)
    if out is None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((N, K, P, Q), dtype=x.dtype, device=x.device, memory_format=fmt)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != (N, K, P, Q):
            raise ValueError(f"out must have shape [N, K, P, Q]={[N, K, P, Q]}, got {list(out.shape)}")
        if out.dtype != x.dtype:
            raise TypeError(f"out dtype must match x dtype {x.dtype}, got {out.dtype}")
        if out.device != x.device:
            raise ValueError(f"out must be on x's device {x.device}, got {out.device}")
        # Autotuning reruns the kernel; an aliased input would be read after
        # being overwritten, so in-place use is rejected outright.
        for name, t in (("x", x), ("weight", weight), ("residual", residual)):
            if t is not None and _same_memory(out, t):
                raise ValueError(f"out must not share memory with {name}")

    M = N * P * Q
    if M == 0 or K == 0:
        return out

    # ---- launch ----------------------------------------------------------- #
    # [K, C, R, S] -> [R, S, C, K] -> [R*S*C, K]: reduction order (r, s, c).
    w_mat = weight.permute(2, 3, 1, 0).reshape(R * S * C, K).contiguous()
    scale_c = scale.contiguous()
    shift_c = shift.contiguous()

    if residual is not None:
        res_arg = residual
        srn, srk, srp, srq = residual.stride()
    else:
        res_arg = out  # never read: HAS_RES=False removes the load
        srn = srk = srp = srq = 0
    son, sok, sop, soq = out.stride()
    sxn, sxc, sxh, sxw = x.stride()

    # Within-image x offsets (c, h, w parts) and weight offsets are int32 unless
    # they can exceed it; out-of-range lanes are masked so only the true
    # in-bounds extent matters.
    idx64 = _max_offset(x, (1, 2, 3)) > _INT32_LIMIT or w_mat.numel() > _INT32_LIMIT

    interp = is_interpreter()
    dot_fp32 = interp and x.dtype != torch.float32
    precision = "tf32" if (x.dtype == torch.float32 and _tf32_allowed(x)) else "ieee"
    m_bucket = triton.next_power_of_2(M)

    args = (
        x, w_mat, scale_c, shift_c, res_arg, out,
        M, K, C, H, W, P, Q, R * S * C,
        sh, sw, ph, pw, dh, dw,
        sxn, sxc, sxh, sxw,
        srn, srk, srp, srq,
        son, sok, sop, soq,
        m_bucket,
    )
    if stats is None:
        args += (out, out, out)  # never touched: STATS=False removes the stores
    else:
        args += tuple(stats)
    flags = dict(
        R=R,
        S=S,
        HAS_RES=residual is not None,
        RELU=bool(relu),
        DOT_FP32=dot_fp32,
        INPUT_PRECISION=precision,
        IDX64=idx64,
        STATS=stats is not None,
    )

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

    if config is None and not interp:
        _autotuned_kernel()[grid](*args, **flags)
    else:
        cfg = config if config is not None else CONFIGS[0]
        _conv_bn_act_heur[grid](
            *args,
            **flags,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return out
