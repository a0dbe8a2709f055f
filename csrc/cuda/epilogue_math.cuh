// Index and value arithmetic of the BN + residual + ReLU epilogue (csrc/cuda/epilogue.cu).
//
// Plain C++ on int64_t/float with no torch or CUDA dependency, so the host-side test
// (tests/test_build.py) compiles this header with g++ and checks it against Python. Every index
// is 64-bit: a [N, K, P, Q] activation may exceed 2^31 elements.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RK_HOST_DEVICE inline  // g++/clang host-only build (the test): no CUDA qualifiers
#endif

namespace resnet_kernels {
namespace epilogue {

// (n, k, p, q) of one element of a [N, K, P, Q] tensor.
struct Coord {
  int64_t n, k, p, q;
};

// Element strides of a [N, K, P, Q] tensor, in the same order as Coord.
struct Strides {
  int64_t n, k, p, q;
};

// quot = a / b, rem = a % b for a >= 0, b > 0. Uses the 32-bit divide when both operands fit:
// a 64-bit division is a long software routine on the GPU, a 32-bit one a few instructions.
RK_HOST_DEVICE void divmod(int64_t a, int64_t b, int64_t& quot, int64_t& rem) {
  if (((static_cast<uint64_t>(a) | static_cast<uint64_t>(b)) >> 32) == 0) {
    const uint32_t a32 = static_cast<uint32_t>(a), b32 = static_cast<uint32_t>(b);
    const uint32_t q32 = a32 / b32;
    quot = static_cast<int64_t>(q32);
    rem = static_cast<int64_t>(a32 - q32 * b32);
  } else {
    quot = a / b;
    rem = a - quot * b;
  }
}

// Linear index of a dense channels_last (NHWC) tensor -> (n, k, p, q). k is innermost.
RK_HOST_DEVICE Coord nhwc_coord(int64_t i, int64_t K, int64_t P, int64_t Q) {
  Coord c;
  int64_t t;
  divmod(i, K, t, c.k);
  divmod(t, Q, t, c.q);
  divmod(t, P, c.n, c.p);
  return c;
}

// NCHW planes: plane index (n * K + k) -> (n, k); index inside a plane (p * Q + q) -> (p, q).
RK_HOST_DEVICE void plane_coord(int64_t plane, int64_t K, int64_t& n, int64_t& k) { divmod(plane, K, n, k); }
RK_HOST_DEVICE void pixel_coord(int64_t j, int64_t Q, int64_t& p, int64_t& q) { divmod(j, Q, p, q); }

// Linear index of a dense NCHW tensor -> (n, k, p, q), through the plane decomposition the
// NCHW kernel uses (one plane per (n, k), scale/shift constant across it).
RK_HOST_DEVICE Coord nchw_coord(int64_t i, int64_t K, int64_t P, int64_t Q) {
  Coord c;
  int64_t plane, j;
  divmod(i, P * Q, plane, j);
  plane_coord(plane, K, c.n, c.k);
  pixel_coord(j, Q, c.p, c.q);
  return c;
}

// Element offset of (n, k, p, q) in a tensor with strides s (any view: sliced, permuted, expanded).
RK_HOST_DEVICE int64_t offset(const Coord& c, const Strides& s) {
  return c.n * s.n + c.k * s.k + c.p * s.p + c.q * s.q;
}

// Offset in a strided residual of the element at linear index i of a dense NHWC output.
RK_HOST_DEVICE int64_t residual_offset_nhwc(int64_t i, int64_t K, int64_t P, int64_t Q, const Strides& s) {
  return offset(nhwc_coord(i, K, P, Q), s);
}

// Offset in a strided residual of the element at linear index i of a dense NCHW output.
RK_HOST_DEVICE int64_t residual_offset_nchw(int64_t i, int64_t K, int64_t P, int64_t Q, const Strides& s) {
  return offset(nchw_coord(i, K, P, Q), s);
}

// Elements per access: a 16-byte vector when `inner` (the run of elements that share one
// decomposition: K for NHWC, P*Q for NCHW) is a multiple of it and every vector-accessed
// address is 16-byte aligned (`addr_bits` = the OR of those addresses); otherwise 1.
RK_HOST_DEVICE int vector_width(int64_t inner, int elem_bytes, uint64_t addr_bits) {
  const int vec = 16 / elem_bytes;
  return (inner % vec == 0 && (addr_bits & 15u) == 0) ? vec : 1;
}

// relu?(v * scale + shift + residual) in fp32. ReLU as a compare, not fmaxf, so a NaN
// propagates as it does through torch.relu.
RK_HOST_DEVICE float bn_act(float v, float scale, float shift, float residual, bool relu) {
  const float r = fmaf(v, scale, shift) + residual;
  return (relu && r < 0.f) ? 0.f : r;
}

}  // namespace epilogue
}  // namespace resnet_kernels
