// sm_80+ implicit-GEMM convolution: mma.sync.m16n8k16 (fp16/bf16 in, fp32 accumulate) fed by
// ldmatrix.x4 from a swizzled, STAGES-deep cp.async ring; fused BN/residual/ReLU epilogue.
// Runs on Ampere, Ada and Hopper (on Hopper at a fraction of peak: the wgmma kernel is faster).
#pragma once

#include "cuda/conv_common.cuh"

namespace resnet_kernels {
namespace conv {

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Tile config: BM x BN outputs per CTA, WARPS_M x WARPS_N warps, STAGES-deep ring of
// (BM + BN) x 64-element stages.
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct Sm80Config {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
  static constexpr int MI = WTM / 16, NI = WTN / 8;
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must be a multiple of 16 x 16");
  static constexpr int A_BYTES = BM * kRowBytes, B_BYTES = BN * kRowBytes;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  // fp32 tile + the statistics scratch of the training kernels (kStats)
  static constexpr int EPI_BYTES = BM * (BN + kPad) * 4 + StatsLayout<BN, THREADS>::kBytes;
  static constexpr int SMEM_BYTES = (PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES) + kSmemAlign;
};

// kStats: the training variant (raw y + per-tile channel statistics, see epilogue_tile).
template <typename T, typename Cfg, bool kVec, bool kStats = false>
__global__ void __launch_bounds__(Cfg::THREADS) conv_bn_act_sm80_kernel(const Params<T> P) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BM = Cfg::BM, BN = Cfg::BN, STAGES = Cfg::STAGES, MI = Cfg::MI, NI = Cfg::NI;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = aligned_smem(smem_raw);
  const uint32_t smem_base = smem_u32(smem);

  const int tid = threadIdx.x;
  const int lane = tid % 32, warp = tid / 32;
  const int wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BN;

  Loader<T, BM, BN, Cfg::THREADS> loader;
  loader.init(P, m0, j0, tid);
  const int64_t k_tiles = (P.Kg + kTileK - 1) / kTileK;

  auto stage_a = [&](int s) { return smem_base + s * Cfg::STAGE_BYTES; };
  auto stage_b = [&](int s) { return smem_base + s * Cfg::STAGE_BYTES + Cfg::A_BYTES; };
  auto load = [&](int64_t kt, int s) {
    if constexpr (kVec) loader.load_vec(P, kt * kTileK, stage_a(s), stage_b(s));
    else loader.load_scalar(P, kt * kTileK, stage_a(s), stage_b(s));
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load(s, s);
    cp_async_commit();
  }

  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt is in shared memory for every thread; stage (kt-1) % STAGES is free
    const int64_t next = kt + STAGES - 1;
    if (next < k_tiles) load(next, static_cast<int>(next % STAGES));
    cp_async_commit();

    const int s = static_cast<int>(kt % STAGES);
    const uint32_t a_s = stage_a(s), b_s = stage_b(s);
#pragma unroll
    for (int k16 = 0; k16 < kTileK / 16; ++k16) {
      uint32_t af[MI][4], bf[NI][2];
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        const uint32_t row = wm * Cfg::WTM + i * 16 + ldsm_a_row(lane);
        const uint32_t col = k16 * 16 + ldsm_a_col(lane);
        ldsm_x4(a_s + swizzle_elem(row, col), af[i][0], af[i][1], af[i][2], af[i][3]);
      }
#pragma unroll
      for (int j = 0; j < NI / 2; ++j) {
        const uint32_t row = wn * Cfg::WTN + j * 16 + ldsm_b_row(lane);
        const uint32_t col = k16 * 16 + ldsm_b_col(lane);
        ldsm_x4(b_s + swizzle_elem(row, col), bf[2 * j][0], bf[2 * j][1], bf[2 * j + 1][0], bf[2 * j + 1][1]);
      }
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j) mma_16816<T>(acc[i][j], af[i], bf[j]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the ring: reuse it for the fp32 tile

  float* tile = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = wm * Cfg::WTM + i * 16 + acc_row(lane, 2 * h);
        const int col = wn * Cfg::WTN + j * 8 + acc_col(lane, 2 * h);
        *reinterpret_cast<float2*>(tile + row * (BN + kPad) + col) = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
      }
  __syncthreads();
  epilogue_tile<T, BM, BN, Cfg::THREADS, kStats>(P, tile, m0, j0, tid);
#endif
}

// The two tile shapes: large for the big layers, small when the large one leaves SMs idle.
using Sm80Large = Sm80Config<128, 128, 2, 4, 3>;  // 8 warps, warp tile 64 x 32, 96 KB ring
using Sm80Small = Sm80Config<64, 64, 2, 2, 3>;    // 4 warps, warp tile 32 x 32, 48 KB ring

}  // namespace conv
}  // namespace resnet_kernels
