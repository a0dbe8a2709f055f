// Launchers of the sm_90a wgmma kernel (csrc/cuda/conv_sm90.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "cuda/conv_launch.h"
#include "cuda/conv_sm90.cuh"

namespace resnet_kernels {
namespace conv {

template <typename T, typename Cfg>
static void launch_cfg(const Params<T>& p, cudaStream_t stream) {
  auto kernel = p.stats ? conv_bn_act_sm90_kernel<T, Cfg, true> : conv_bn_act_sm90_kernel<T, Cfg, false>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM_BYTES));
  const int64_t mt = (p.M + Cfg::BM - 1) / Cfg::BM, nt = (p.g.K + Cfg::BN - 1) / Cfg::BN;
  TORCH_CHECK(mt < (int64_t{1} << 31) && nt < 65536, "conv_bn_act (cuda): GEMM of ", p.M, " x ", p.g.K,
              " is too large for one launch");
  kernel<<<dim3(static_cast<unsigned>(mt), static_cast<unsigned>(nt)), Cfg::THREADS, Cfg::SMEM_BYTES, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

static_assert(Sm90Wide::BM == 128 && Sm90Narrow::BM == 128, "plan_tile_m assumes 128-row wgmma tiles");

template <typename T>
void launch_sm90(const Params<T>& p, cudaStream_t stream) {
  if (p.g.K <= 64) launch_cfg<T, Sm90Narrow>(p, stream);
  else launch_cfg<T, Sm90Wide>(p, stream);
}

template void launch_sm90<__half>(const Params<__half>&, cudaStream_t);
template void launch_sm90<__nv_bfloat16>(const Params<__nv_bfloat16>&, cudaStream_t);

}  // namespace conv
}  // namespace resnet_kernels
