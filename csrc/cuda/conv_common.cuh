// Device building blocks shared by the implicit-GEMM kernels (sm_80 mma.sync and sm_90a wgmma):
// PTX wrappers, the global -> shared tile loaders (cp.async with zero fill, or predicated scalar
// loads for channel counts that are not a multiple of 8), and the fused epilogue that reads the
// fp32 accumulator tile back from shared memory and writes 16-byte vectors.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/conv_math.cuh"

namespace resnet_kernels {
namespace conv {

// Everything a kernel needs, by value (kernel parameter space).
template <typename T>
struct Params {
  const T* __restrict__ x;       // [N, H, W, C] dense
  const T* __restrict__ w;       // [K, R, S, C] dense
  const float* __restrict__ scale;  // [K], 16-byte aligned
  const float* __restrict__ shift;  // [K], 16-byte aligned
  const T* res;                  // residual element (n, k, p, q) at res + rs.n*n + rs.k*k + ..., or nullptr
  T* y;                          // [N, P, Q, K] dense
  Geom g;
  epilogue::Strides rs;
  int64_t M, Kg;
  int res_mode;                  // 0 none, 1 dense NHWC (y's layout), 2 any strides
  bool res_vec;                  // dense residual readable in 16-byte vectors
  bool y_vec;                    // K % 8 == 0: y rows are 16-byte aligned
  bool relu;
  // Training (batch statistics). stats: the launchers take the conv_bn_stats_* kernels, which store
  // the raw accumulator as y (scale/shift/res/relu unused) and, per M tile t = blockIdx.x, the
  // per-channel sum over the tile's valid rows, psum[t * K + k], the sum of squared deviations from
  // that tile mean, pm2[t * K + k], and the valid row count pcnt[t] (fp32, plain stores). The
  // buffers have plan_tile_m(...) -> cdiv(M, BM) rows; the host combines them (Chan et al.).
  bool stats;
  float* psum;
  float* pm2;
  float* pcnt;
};

enum ResMode : int { kResNone = 0, kResDense = 1, kResStrided = 2 };

// --- PTX wrappers ---------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; src_bytes = 0 writes 16 zero bytes (padding).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void st_shared_16(uint32_t dst, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}

// --- fp32 <-> element type (torch builds with __CUDA_NO_HALF_CONVERSIONS__) ------------------
template <typename T>
__device__ __forceinline__ float to_f32(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// --- tile loaders ---------------------------------------------------------------------------------
// One stage = an A tile (BM rows of the im2col matrix) and a B tile (BN output channels), each
// row kTileK elements of the reduction, in the swizzled layout of conv_math.cuh. Thread t owns
// chunk (t % 8) of rows t / 8 + i * (THREADS / 8): the chunk and so the reduction tap are the
// same for all of its rows, and the per-row pixel decomposition is done once per kernel.
template <typename T, int BM, int BN, int THREADS>
struct Loader {
  static_assert(THREADS % 8 == 0, "threads must be a multiple of 8");
  static constexpr int kRowsPerPass = THREADS / 8;
  static constexpr int kAIters = BM / kRowsPerPass;
  static constexpr int kBIters = BN / kRowsPerPass;
  static_assert(BM % kRowsPerPass == 0 && BN % kRowsPerPass == 0, "tile rows must split evenly over threads");

  Row rows[kAIters];
  int64_t m0;
  int64_t j0;
  int chunk;
  int row0;

  __device__ __forceinline__ void init(const Params<T>& P, int64_t m_tile, int64_t n_tile, int tid) {
    chunk = tid % 8;
    row0 = tid / 8;
    m0 = m_tile;
    j0 = n_tile;
#pragma unroll
    for (int i = 0; i < kAIters; ++i) rows[i] = row_info(P.g, m0 + row0 + i * kRowsPerPass);
  }

  // C % 8 == 0: 8 consecutive reduction indices are 8 channels of one input pixel (16 bytes).
  __device__ __forceinline__ void load_vec(const Params<T>& P, int64_t k0, uint32_t a_smem, uint32_t b_smem) {
    const int64_t kk = k0 + chunk * 8;
    const Tap t = tap_info(P.g, kk);
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      const int64_t off = a_offset(P.g, rows[i], t);
      const int r = row0 + i * kRowsPerPass;
      cp_async_16(a_smem + swizzle_offset(r, chunk), P.x + (off < 0 ? 0 : off), off >= 0);
    }
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int r = row0 + i * kRowsPerPass;
      const int64_t off = b_offset(P.g, j0 + r, kk);
      cp_async_16(b_smem + swizzle_offset(r, chunk), P.w + (off < 0 ? 0 : off), off >= 0);
    }
  }

  // Any C (the 7x7 stem has C = 3): each of the 8 elements of a chunk has its own tap and
  // predicate; plain loads, packed into one 16-byte shared store.
  __device__ __forceinline__ void load_scalar(const Params<T>& P, int64_t k0, uint32_t a_smem, uint32_t b_smem) {
    const int64_t kk0 = k0 + chunk * 8;
    Tap taps[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) taps[e] = tap_info(P.g, kk0 + e);
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      union {
        uint4 u;
        T v[8];
      } pack;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int64_t off = a_offset(P.g, rows[i], taps[e]);
        pack.v[e] = off >= 0 ? P.x[off] : from_f32<T>(0.f);
      }
      st_shared_16(a_smem + swizzle_offset(row0 + i * kRowsPerPass, chunk), pack.u);
    }
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int r = row0 + i * kRowsPerPass;
      union {
        uint4 u;
        T v[8];
      } pack;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int64_t off = b_offset(P.g, j0 + r, kk0 + e);
        pack.v[e] = off >= 0 ? P.w[off] : from_f32<T>(0.f);
      }
      st_shared_16(b_smem + swizzle_offset(r, chunk), pack.u);
    }
  }
};

// --- epilogue -------------------------------------------------------------------------------------
// The fp32 accumulator tile sits in shared memory as tile[BM][BN + kPad]. Each thread takes runs
// of 8 output channels of one pixel: scale/shift (fp32), residual, ReLU, convert, one 16-byte
// store when the run is whole and K % 8 == 0; element by element otherwise.
constexpr int kPad = 4;

// kRaw (training): store the accumulator itself, converted to T (no BN / residual / ReLU).
template <typename T, int BM, int BN, int THREADS, bool kRaw = false>
__device__ __forceinline__ void store_tile(const Params<T>& P, const float* tile, int64_t m0, int64_t j0, int tid) {
  constexpr int kRuns = BN / 8;
  const int64_t K = P.g.K;
  for (int idx = tid; idx < BM * kRuns; idx += THREADS) {
    const int r = idx / kRuns;
    const int c = (idx % kRuns) * 8;
    const int64_t m = m0 + r;
    const int64_t j = j0 + c;
    if (m >= P.M || j >= K) continue;
    const float4 lo = *reinterpret_cast<const float4*>(tile + r * (BN + kPad) + c);
    const float4 hi = *reinterpret_cast<const float4*>(tile + r * (BN + kPad) + c + 4);
    float acc[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    const bool whole = j + 8 <= K;
    if constexpr (!kRaw) {
      float sc[8], sh[8], rv[8];
      if (whole) {
        const float4 s0 = *reinterpret_cast<const float4*>(P.scale + j);
        const float4 s1 = *reinterpret_cast<const float4*>(P.scale + j + 4);
        const float4 h0 = *reinterpret_cast<const float4*>(P.shift + j);
        const float4 h1 = *reinterpret_cast<const float4*>(P.shift + j + 4);
        sc[0] = s0.x; sc[1] = s0.y; sc[2] = s0.z; sc[3] = s0.w; sc[4] = s1.x; sc[5] = s1.y; sc[6] = s1.z; sc[7] = s1.w;
        sh[0] = h0.x; sh[1] = h0.y; sh[2] = h0.z; sh[3] = h0.w; sh[4] = h1.x; sh[5] = h1.y; sh[6] = h1.z; sh[7] = h1.w;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          sc[e] = j + e < K ? P.scale[j + e] : 0.f;
          sh[e] = j + e < K ? P.shift[j + e] : 0.f;
        }
      }
      if (P.res_mode == kResDense && P.res_vec && whole) {
        union {
          uint4 u;
          T v[8];
        } pack;
        pack.u = *reinterpret_cast<const uint4*>(P.res + m * K + j);
#pragma unroll
        for (int e = 0; e < 8; ++e) rv[e] = to_f32(pack.v[e]);
      } else if (P.res_mode == kResDense) {
#pragma unroll
        for (int e = 0; e < 8; ++e) rv[e] = j + e < K ? to_f32(P.res[m * K + j + e]) : 0.f;
      } else if (P.res_mode == kResStrided) {
        const int64_t base = residual_offset(P.g, m, j, P.rs);
#pragma unroll
        for (int e = 0; e < 8; ++e) rv[e] = j + e < K ? to_f32(P.res[base + e * P.rs.k]) : 0.f;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) rv[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = epilogue::bn_act(acc[e], sc[e], sh[e], rv[e], P.relu);
    }
    union {
      uint4 u;
      T v[8];
    } out;
#pragma unroll
    for (int e = 0; e < 8; ++e) out.v[e] = from_f32<T>(acc[e]);
    T* dst = P.y + m * K + j;
    if (whole && P.y_vec) {
      *reinterpret_cast<uint4*>(dst) = out.u;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (j + e < K) dst[e] = out.v[e];
    }
  }
}

// --- training epilogue: raw store (store_tile<kRaw>) + per-tile channel statistics ---------------
// Shared-memory scratch of tile_stats, after the fp32 tile: kStatGroups row groups x BN partial
// sums, as many partial squared deviations, and BN tile means.
template <int BN, int THREADS>
struct StatsLayout {
  static_assert(BN % 4 == 0 && THREADS % (BN / 4) == 0, "threads must cover the tile's float4 columns evenly");
  static constexpr int kCols4 = BN / 4;                // float4 columns of the tile
  static constexpr int kGroups = THREADS / kCols4;     // row groups (one partial per group and column)
  static constexpr int kBytes = (2 * kGroups * BN + BN) * 4;
};

// The value y holds after the store: the fp32 accumulator rounded to T. The statistics are those
// of y as stored, like BatchNorm on the eager conv's output (normalising stored values with the
// statistics of unrounded ones is off by their rounding, which matters when a channel's spread is
// small next to its mean).
template <typename T>
__device__ __forceinline__ float4 as_stored(float4 v) {
  return make_float4(to_f32(from_f32<T>(v.x)), to_f32(from_f32<T>(v.y)), to_f32(from_f32<T>(v.z)),
                     to_f32(from_f32<T>(v.w)));
}

// Per-channel statistics of one BM x BN fp32 tile (tile[r * (BN + kPad) + c]) as stored (as_stored), over its valid rows
// r < min(BM, M - m0) only (rows past M are zero-filled GEMM padding and must not count):
//   psum[t * K + k] = sum_r v,   pm2[t * K + k] = sum_r (v - sum / cnt)^2,   pcnt[t] = cnt,
// t = blockIdx.x. Two passes over the tile (sum, then squared deviations from the tile mean:
// no cancellation however large the mean is), each thread a float4 column and every
// kGroups-th row, partials combined in a fixed order: the result is deterministic. The caller
// has __syncthreads()'d after the tile was written; columns past K are computed, not stored.
template <typename T, int BM, int BN, int THREADS>
__device__ __forceinline__ void tile_stats(const Params<T>& P, const float* tile, float* scratch, int64_t m0,
                                           int64_t j0, int tid) {
  using L = StatsLayout<BN, THREADS>;
  constexpr int G = L::kGroups;
  float* part_s = scratch;               // [G][BN]
  float* part_q = scratch + G * BN;      // [G][BN]
  float* tmean = scratch + 2 * G * BN;   // [BN]
  const int c4 = tid % L::kCols4, g = tid / L::kCols4;
  const int64_t rem = P.M - m0;
  const int cnt = rem < BM ? static_cast<int>(rem) : BM;  // >= 1: the tile starts inside the GEMM
  const float* col = tile + c4 * 4;

  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int r = g; r < cnt; r += G) {
    const float4 v = as_stored<T>(*reinterpret_cast<const float4*>(col + r * (BN + kPad)));
    s.x += v.x;
    s.y += v.y;
    s.z += v.z;
    s.w += v.w;
  }
  *reinterpret_cast<float4*>(part_s + g * BN + c4 * 4) = s;
  __syncthreads();
  float total = 0.f;  // kept by the threads tid < BN (column tid) for the final store
  if (tid < BN) {
#pragma unroll
    for (int i = 0; i < G; ++i) total += part_s[i * BN + tid];
    tmean[tid] = total / static_cast<float>(cnt);
  }
  __syncthreads();
  const float4 mu = *reinterpret_cast<const float4*>(tmean + c4 * 4);
  float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int r = g; r < cnt; r += G) {
    const float4 v = as_stored<T>(*reinterpret_cast<const float4*>(col + r * (BN + kPad)));
    const float dx = v.x - mu.x, dy = v.y - mu.y, dz = v.z - mu.z, dw = v.w - mu.w;
    q.x = fmaf(dx, dx, q.x);
    q.y = fmaf(dy, dy, q.y);
    q.z = fmaf(dz, dz, q.z);
    q.w = fmaf(dw, dw, q.w);
  }
  *reinterpret_cast<float4*>(part_q + g * BN + c4 * 4) = q;
  __syncthreads();
  const int64_t K = P.g.K;
  if (tid < BN && j0 + tid < K) {
    float m2 = 0.f;
#pragma unroll
    for (int i = 0; i < G; ++i) m2 += part_q[i * BN + tid];
    const int64_t o = static_cast<int64_t>(blockIdx.x) * K + j0 + tid;
    P.psum[o] = total;
    P.pm2[o] = m2;
  }
  if (tid == 0 && blockIdx.y == 0) P.pcnt[blockIdx.x] = static_cast<float>(cnt);
}

// The whole epilogue after the fp32 tile is staged (and __syncthreads()'d): BN/residual/ReLU for
// inference, raw store + tile statistics for training (kStats: a separate kernel, so the
// inference kernels carry none of it).
template <typename T, int BM, int BN, int THREADS, bool kStats>
__device__ __forceinline__ void epilogue_tile(const Params<T>& P, float* tile, int64_t m0, int64_t j0, int tid) {
  if constexpr (kStats) {
    store_tile<T, BM, BN, THREADS, true>(P, tile, m0, j0, tid);
    tile_stats<T, BM, BN, THREADS>(P, tile, tile + BM * (BN + kPad), m0, j0, tid);
  } else {
    store_tile<T, BM, BN, THREADS>(P, tile, m0, j0, tid);
  }
}

// Dynamic shared memory, rounded up to 1024 bytes (the 128-byte swizzle's period; wgmma
// descriptors assume it). Launchers allocate kSmemAlign extra bytes.
constexpr int kSmemAlign = 1024;
__device__ __forceinline__ uint8_t* aligned_smem(uint8_t* raw) {
  const uint32_t a = smem_u32(raw);
  return raw + ((kSmemAlign - (a % kSmemAlign)) % kSmemAlign);
}

}  // namespace conv
}  // namespace resnet_kernels
