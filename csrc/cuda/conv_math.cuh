// Index arithmetic of the implicit-GEMM convolution kernels (csrc/cuda/conv_bn_act*.cu).
//
// Plain C++ on integers with no torch or CUDA dependency, so the host-side test
// (tests/test_build.py) compiles this header with g++ and checks it against Python: the im2col
// addressing for every filter / stride / padding / dilation and tail, the shared-memory swizzle,
// and the thread -> fragment maps of ldmatrix / mma.sync / wgmma as the kernels use them.
//
// GEMM view of an NHWC convolution (csrc/cuda/README or ../shared/design/KERNEL_NOTES.md):
//   rows    m  = (n, p, q)        M  = N * P * Q      output pixels
//   columns j  = k                Nn = K              output channels
//   reduce  kk = (r, s, c)        Kg = R * S * C      c innermost, so 8 consecutive kk with
//                                                     C % 8 == 0 are one 16-byte load
// A[m, kk] = x[n, p*sh - ph + r*dh, q*sw - pw + s*dw, c]  (zero outside the image)
// B[kk, j] = w[j, r, s, c]      (KRSC: the weight in channels_last)
// y[m, j]  is the NHWC output, so y's offset of (m, j) is m * K + j.
#pragma once

#include <cstdint>

#include "cuda/epilogue_math.cuh"  // RK_HOST_DEVICE, divmod, Coord, Strides, bn_act

namespace resnet_kernels {
namespace conv {

using epilogue::divmod;

struct Geom {
  int64_t N, H, W, C;  // input, NHWC
  int64_t K, R, S;     // filter, KRSC
  int64_t P, Q;        // output spatial size
  int64_t sh, sw, ph, pw, dh, dw;
};

// floor((in + 2 pad - dil (k - 1) - 1) / stride) + 1, as torch computes it. C++ `/` truncates toward
// zero, which would turn a slightly negative numerator (filter larger than the padded input)
// into a 1-pixel output instead of an empty one: floor explicitly.
RK_HOST_DEVICE int64_t out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  const int64_t num = in + 2 * pad - dil * (k - 1) - 1;
  const int64_t q = num / stride;
  return (num % stride != 0 && num < 0 ? q - 1 : q) + 1;
}

RK_HOST_DEVICE int64_t gemm_m(const Geom& g) { return g.N * g.P * g.Q; }
RK_HOST_DEVICE int64_t gemm_k(const Geom& g) { return g.R * g.S * g.C; }

// Everything a thread needs about one GEMM row (output pixel), computed once per row.
struct Row {
  int64_t base;  // offset of x[n, 0, 0, 0]
  int32_t h0;    // p * sh - ph: input row of filter tap r = 0 (an image side fits in 32 bits)
  int32_t w0;    // q * sw - pw
  bool valid;    // m < M
};

RK_HOST_DEVICE Row row_info(const Geom& g, int64_t m) {
  Row row;
  row.valid = m < gemm_m(g);
  if (!row.valid) m = 0;
  int64_t n, pq, p, q;
  divmod(m, g.P * g.Q, n, pq);
  divmod(pq, g.Q, p, q);
  row.base = n * g.H * g.W * g.C;
  row.h0 = static_cast<int32_t>(p * g.sh - g.ph);
  row.w0 = static_cast<int32_t>(q * g.sw - g.pw);
  return row;
}

// Reduction index kk -> (r, s, c).
struct Tap {
  int32_t r, s, c;
  bool valid;  // kk < Kg
};

RK_HOST_DEVICE Tap tap_info(const Geom& g, int64_t kk) {
  Tap t;
  t.valid = kk < gemm_k(g);
  int64_t rs, r, s, c;
  divmod(t.valid ? kk : 0, g.C, rs, c);
  divmod(rs, g.S, r, s);
  t.r = static_cast<int32_t>(r);
  t.s = static_cast<int32_t>(s);
  t.c = static_cast<int32_t>(c);
  return t;
}

// Offset of A[m, kk] in the NHWC input, or -1 where the tap falls in the zero padding or
// outside the GEMM (m >= M or kk >= Kg).
RK_HOST_DEVICE int64_t a_offset(const Geom& g, const Row& row, const Tap& t) {
  const int64_t h = row.h0 + t.r * g.dh;
  const int64_t w = row.w0 + t.s * g.dw;
  if (!row.valid || !t.valid || h < 0 || h >= g.H || w < 0 || w >= g.W) return -1;
  return row.base + (h * g.W + w) * g.C + t.c;
}

RK_HOST_DEVICE int64_t im2col_offset(const Geom& g, int64_t m, int64_t kk) {
  return a_offset(g, row_info(g, m), tap_info(g, kk));
}

// Offset of B[kk, j] (= w[j, r, s, c]) in the KRSC weight, or -1 outside the GEMM.
RK_HOST_DEVICE int64_t b_offset(const Geom& g, int64_t j, int64_t kk) {
  if (j >= g.K || kk >= gemm_k(g)) return -1;
  return j * gemm_k(g) + kk;
}

// --- shared memory ------------------------------------------------------------------------------
// A stage holds a tile of `rows` x 64 elements (fp16/bf16: 128 bytes per row) for A (rows = m)
// and for B (rows = output channel j, kk contiguous). The 16-byte chunk c of row r sits at chunk
// c ^ (r % 8): the "128-byte swizzle" that Hopper's wgmma descriptors (swizzle mode 1) and TMA
// expect when the tile is 1024-byte aligned, and for ldmatrix it makes the 8 row addresses of
// one 8x8 matrix hit 8 distinct 16-byte bank groups (no conflicts). cp.async writes a warp's 32
// chunks to 4 whole rows (512 contiguous bytes): no conflicts either.
constexpr int kTileK = 64;          // elements of the reduction per stage
constexpr int kRowBytes = 128;      // kTileK * 2 bytes
constexpr int kChunksPerRow = 8;    // 16-byte chunks per row

RK_HOST_DEVICE uint32_t swizzle_offset(uint32_t row, uint32_t chunk) {
  return row * kRowBytes + ((chunk ^ (row % 8)) * 16);
}

// Byte offset of element (row, col) (col < 64) of a swizzled tile.
RK_HOST_DEVICE uint32_t swizzle_elem(uint32_t row, uint32_t col) {
  return swizzle_offset(row, col / 8) + (col % 8) * 2;
}

// --- mma.sync m16n8k16 operand fragments via ldmatrix.x4 (sm_80 path) --------------------------
// A (16 x 16 of a row-major [m][kk] tile): lane l gives the row address of row (l % 16),
// columns (l / 16) * 8 .. +7; the four 8x8 matrices land in a0..a3 in mma's A order.
RK_HOST_DEVICE uint32_t ldsm_a_row(uint32_t lane) { return lane % 16; }
RK_HOST_DEVICE uint32_t ldsm_a_col(uint32_t lane) { return (lane / 16) * 8; }
// B (two n8 x k16 fragments of a [j][kk] tile): lane l gives row j = (l % 8) + (l / 16) * 8,
// columns ((l / 8) % 2) * 8; registers 0,1 = b0,b1 of the first n8 tile, 2,3 of the second.
RK_HOST_DEVICE uint32_t ldsm_b_row(uint32_t lane) { return (lane % 8) + (lane / 16) * 8; }
RK_HOST_DEVICE uint32_t ldsm_b_col(uint32_t lane) { return ((lane / 8) % 2) * 8; }

// Accumulator element i (0..3) of lane l in an m16n8 tile: row, column. The same map serves
// each m16 x n8 piece of wgmma's m64nN accumulator (warp w of the warpgroup: rows + 16 w).
RK_HOST_DEVICE uint32_t acc_row(uint32_t lane, uint32_t i) { return lane / 4 + (i / 2) * 8; }
RK_HOST_DEVICE uint32_t acc_col(uint32_t lane, uint32_t i) { return (lane % 4) * 2 + (i % 2); }

// --- wgmma shared-memory matrix descriptor (sm_90a path) ----------------------------------------
// K-major operand in the 128-byte swizzle: start address >> 4 in bits 0-13, leading byte offset
// (unused for swizzled K-major; 1 by convention) in 16-29, stride byte offset (1024 bytes between
// 8-row groups) >> 4 in 32-45, swizzle mode 1 (128B) in bits 62-63.
RK_HOST_DEVICE uint64_t wgmma_desc(uint32_t smem_addr) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>(1) << 16;
  d |= static_cast<uint64_t>(1024 >> 4) << 32;
  d |= static_cast<uint64_t>(1) << 62;
  return d;
}

// --- epilogue -----------------------------------------------------------------------------------
// Residual element (m, j) at strides rs (n, k, p, q) of a [N, K, P, Q] tensor.
RK_HOST_DEVICE int64_t residual_offset(const Geom& g, int64_t m, int64_t j, const epilogue::Strides& rs) {
  int64_t n, pq, p, q;
  divmod(m, g.P * g.Q, n, pq);
  divmod(pq, g.Q, p, q);
  return n * rs.n + j * rs.k + p * rs.p + q * rs.q;
}

}  // namespace conv
}  // namespace resnet_kernels
