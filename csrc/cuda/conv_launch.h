// Host-side launchers of the implicit-GEMM kernels, one translation unit per kernel family so
// the two compile in parallel (conv_bn_act.cu: sm_80 mma.sync; conv_bn_act_sm90.cu: wgmma).
#pragma once

#include <cuda_runtime.h>

#include "cuda/conv_common.cuh"

namespace resnet_kernels {
namespace conv {

// kVec: C % 8 == 0 and x, w 16-byte aligned (cp.async path); otherwise predicated scalar loads.
template <typename T>
void launch_sm80(const Params<T>& p, bool vec, int sms, cudaStream_t stream);

// wgmma kernel: needs an sm_90a device, the sm_90a build, and the vector path.
template <typename T>
void launch_sm90(const Params<T>& p, cudaStream_t stream);

// Rows of the GEMM M tile the chosen kernel uses (the training kernels write one row of
// statistics per M tile: the host sizes psum/pm2/pcnt with it).
int plan_tile_m(int cc_major, bool have_sm90a, bool vec, int64_t M, int64_t K, int sms);

// Which kernel and tile a call takes (reported by conv_bn_act_cuda_plan for tests/benchmarks).
const char* plan_name(int cc_major, bool have_sm90a, bool vec, int64_t M, int64_t K, int sms);

}  // namespace conv
}  // namespace resnet_kernels
