// conv_bn_act_cuda: the hand-written CUDA backend of conv_bn_act.
//
//   y = relu?(conv(x, W)[k] * scale[k] + shift[k] + residual)      scale, shift fp32
//
// One kernel per call: an NHWC implicit-GEMM convolution on tensor cores (fp16/bf16 operands,
// fp32 accumulation) whose epilogue applies BN, the residual and ReLU before the only store.
//   sm_90a devices: wgmma kernel (csrc/cuda/conv_sm90.cuh) when C % 8 == 0;
//   otherwise:      mma.sync kernel (csrc/cuda/conv_sm80.cuh), cp.async when C % 8 == 0,
//                   predicated scalar loads for any other C (the 7x7 stem's C = 3).
// Returns y in channels_last; the Python side gives it the layout the op's contract names.
// Index math: csrc/cuda/conv_math.cuh (64-bit, host-tested).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <tuple>
#include <string>

#include "cuda/conv_launch.h"
#include "cuda/conv_sm80.cuh"

namespace resnet_kernels {
namespace conv {

template <typename T, typename Cfg, bool kVec>
static void launch_cfg(const Params<T>& p, cudaStream_t stream) {
  auto kernel = p.stats ? conv_bn_act_sm80_kernel<T, Cfg, kVec, true> : conv_bn_act_sm80_kernel<T, Cfg, kVec, false>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM_BYTES));
  const int64_t mt = (p.M + Cfg::BM - 1) / Cfg::BM, nt = (p.g.K + Cfg::BN - 1) / Cfg::BN;
  TORCH_CHECK(mt < (int64_t{1} << 31) && nt < 65536, "conv_bn_act (cuda): GEMM of ", p.M, " x ", p.g.K,
              " is too large for one launch");
  kernel<<<dim3(static_cast<unsigned>(mt), static_cast<unsigned>(nt)), Cfg::THREADS, Cfg::SMEM_BYTES, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

static bool use_large(int64_t M, int64_t K, int sms) {
  return ((M + 127) / 128) * ((K + 127) / 128) >= sms;
}

template <typename T>
void launch_sm80(const Params<T>& p, bool vec, int sms, cudaStream_t stream) {
  const bool large = use_large(p.M, p.g.K, sms);
  if (vec) {
    if (large) launch_cfg<T, Sm80Large, true>(p, stream);
    else launch_cfg<T, Sm80Small, true>(p, stream);
  } else {  // scalar loads bound these calls (the stem); the small tile keeps registers in check
    launch_cfg<T, Sm80Small, false>(p, stream);
  }
}

template void launch_sm80<__half>(const Params<__half>&, bool, int, cudaStream_t);
template void launch_sm80<__nv_bfloat16>(const Params<__nv_bfloat16>&, bool, int, cudaStream_t);

int plan_tile_m(int cc_major, bool have_sm90a, bool vec, int64_t M, int64_t K, int sms) {
  if (cc_major == 9 && have_sm90a && vec) return 128;  // Sm90Wide / Sm90Narrow
  return vec && use_large(M, K, sms) ? Sm80Large::BM : Sm80Small::BM;
}

const char* plan_name(int cc_major, bool have_sm90a, bool vec, int64_t M, int64_t K, int sms) {
  if (cc_major == 9 && have_sm90a && vec) return K <= 64 ? "sm90_wgmma_128x64" : "sm90_wgmma_128x128";
  const bool large = use_large(M, K, sms);
  if (vec) return large ? "sm80_mma_cpasync_128x128" : "sm80_mma_cpasync_64x64";
  return "sm80_mma_scalar_64x64";
}

namespace {

constexpr const char* kOp = "conv_bn_act (cuda backend)";

bool built_with_sm90a() {
#ifdef RESNET_KERNELS_CUDA_ARCHS
  return std::string(RESNET_KERNELS_CUDA_ARCHS).find("9.0a") != std::string::npos;
#else
  return false;
#endif
}

// RESNET_KERNELS_CUDA_FORCE_SM80=1 sends sm_90 devices to the mma.sync kernels too, so one H100/H200
// can test both kernel families (tests and scripts/device_check.sh use it).
bool force_sm80() {
  const char* v = std::getenv("RESNET_KERNELS_CUDA_FORCE_SM80");
  return v != nullptr && v[0] == '1';
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

at::Tensor aligned_f32(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (!aligned16(c.data_ptr())) c = c.clone();
  return c;
}

void check_vec(const at::Tensor& t, const char* name, int64_t K, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == K, kOp, ": ", name, " must be a 1-D tensor of K=", K,
              " output channels, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, kOp, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), kOp, ": ", name, " must be on x's device ", x.device(), ", got ",
              t.device());
}

struct Call {
  at::Tensor x, w, scale, shift, y;
  std::optional<at::Tensor> res;
  Geom g;
  bool vec;
};

Call prepare(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift,
             const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
             at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, kOp, ": x must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, kOp, ": weight must be 4-D [K, C, R, S], got shape ", weight.sizes());
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(weight.device() == x.device(), kOp, ": weight must be on x's device ", x.device(), ", got ",
              weight.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, kOp, ": x must be float16 or bfloat16 (tensor cores), got ",
              dt, "; float32 goes to the triton or torch backend");
  TORCH_CHECK(weight.scalar_type() == dt, kOp, ": weight must have x's dtype ", dt, ", got ", weight.scalar_type());
  TORCH_CHECK(groups == 1, kOp, ": groups must be 1, got ", groups);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, kOp,
              ": stride, padding and dilation must have 2 entries each");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, kOp, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, kOp, ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, kOp, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(weight.size(1) == x.size(1), kOp, ": weight has ", weight.size(1), " input channels but x has ",
              x.size(1), " (groups=1)");
  Call c;
  Geom& g = c.g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.K = weight.size(0);
  g.R = weight.size(2);
  g.S = weight.size(3);
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.P = out_size(g.H, g.R, g.sh, g.ph, g.dh);
  g.Q = out_size(g.W, g.S, g.sw, g.pw, g.dw);
  TORCH_CHECK(g.P > 0 && g.Q > 0, kOp, ": the output would be empty in space (", g.P, " x ", g.Q,
              "): the padded input is smaller than the dilated filter");
  check_vec(scale, "scale", g.K, x);
  check_vec(shift, "shift", g.K, x);
  if (residual.has_value() && residual->defined()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.dim() == 4 && r.size(0) == g.N && r.size(1) == g.K && r.size(2) == g.P && r.size(3) == g.Q, kOp,
                ": residual must have the output's shape [", g.N, ", ", g.K, ", ", g.P, ", ", g.Q, "], got ",
                r.sizes());
    TORCH_CHECK(r.scalar_type() == dt, kOp, ": residual must have x's dtype ", dt, ", got ", r.scalar_type());
    TORCH_CHECK(r.device() == x.device(), kOp, ": residual must be on x's device ", x.device(), ", got ",
                r.device());
    c.res = r;
  }
  c.x = x.contiguous(at::MemoryFormat::ChannelsLast);
  c.w = weight.contiguous(at::MemoryFormat::ChannelsLast);  // KRSC
  c.scale = aligned_f32(scale);
  c.shift = aligned_f32(shift);
  c.y = at::empty({g.N, g.K, g.P, g.Q}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  c.vec = g.C % 8 == 0 && aligned16(c.x.data_ptr()) && aligned16(c.w.data_ptr());
  return c;
}

template <typename T>
Params<T> make_params(const Call& c, bool relu) {
  Params<T> p;
  p.x = reinterpret_cast<const T*>(c.x.const_data_ptr());
  p.w = reinterpret_cast<const T*>(c.w.const_data_ptr());
  p.scale = c.scale.const_data_ptr<float>();
  p.shift = c.shift.const_data_ptr<float>();
  p.y = reinterpret_cast<T*>(c.y.mutable_data_ptr());
  p.g = c.g;
  p.M = gemm_m(c.g);
  p.Kg = gemm_k(c.g);
  p.relu = relu;
  p.y_vec = c.g.K % 8 == 0;
  p.res = nullptr;
  p.res_mode = kResNone;
  p.res_vec = false;
  p.rs = epilogue::Strides{0, 0, 0, 0};
  p.stats = false;
  p.psum = p.pm2 = p.pcnt = nullptr;
  if (c.res.has_value()) {
    const at::Tensor& r = *c.res;
    p.res = reinterpret_cast<const T*>(r.const_data_ptr());
    p.rs = epilogue::Strides{r.stride(0), r.stride(1), r.stride(2), r.stride(3)};
    if (r.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      p.res_mode = kResDense;
      p.res_vec = c.g.K % 8 == 0 && aligned16(r.const_data_ptr());
    } else {
      p.res_mode = kResStrided;
    }
  }
  return p;
}

// The device this call runs on, and whether it takes the wgmma kernel (sm_90a build, sm_90
// device, vector path) or the mma.sync one.
struct Target {
  const cudaDeviceProp* prop;
  bool sm90;
};

Target target(const Call& c) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, kOp, ": needs compute capability 8.0 or newer (mma.sync m16n8k16 with bf16), "
              "this device is ", prop->major, ".", prop->minor);
  return {prop, prop->major == 9 && built_with_sm90a() && c.vec && !force_sm80()};
}

template <typename T>
void launch(const Params<T>& p, const Call& c, const Target& t) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (t.sm90) launch_sm90<T>(p, stream);
  else launch_sm80<T>(p, c.vec, t.prop->multiProcessorCount, stream);
}

at::Tensor conv_bn_act_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                            const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            bool relu) {
  const c10::cuda::CUDAGuard guard(x.device());
  Call c = prepare(x, weight, scale, shift, residual, stride, padding, dilation, groups);
  if (c.y.numel() == 0) return c.y;
  const Target t = target(c);
  auto run = [&](auto tag) { launch(make_params<decltype(tag)>(c, relu), c, t); };
  if (x.scalar_type() == at::kHalf) run(__half{});
  else run(__nv_bfloat16{});
  return c.y;
}

// Training forward, conv half: y = conv(x, W) (raw, channels_last) and per-M-tile channel
// statistics from the fp32 accumulator (no second pass over y): psum[t, k], pm2[t, k] (sum of
// squared deviations from the tile mean) and pcnt[t], t < cdiv(M, tile rows). The host combines
// them (Chan et al.; resnet_kernels/_stats.py), then bn_act_apply_cuda normalises in one pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_stats_cuda(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(weight.dim() == 4, kOp, ": weight must be 4-D [K, C, R, S], got shape ", weight.sizes());
  const at::Tensor ones = at::ones({weight.size(0)}, x.options().dtype(at::kFloat));
  Call c = prepare(x, weight, ones, ones, std::nullopt, stride, padding, dilation, groups);
  const Target t = target(c);
  const int64_t M = gemm_m(c.g), K = c.g.K;
  const int bm = plan_tile_m(t.prop->major, t.sm90, c.vec, M, K, t.prop->multiProcessorCount);
  const int64_t tiles = (M + bm - 1) / bm;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor psum = at::empty({tiles, K}, f32), pm2 = at::empty({tiles, K}, f32), pcnt = at::empty({tiles}, f32);
  if (c.y.numel() == 0) return {c.y, psum, pm2, pcnt};
  auto run = [&](auto tag) {
    Params<decltype(tag)> p = make_params<decltype(tag)>(c, false);
    p.stats = true;
    p.psum = psum.mutable_data_ptr<float>();
    p.pm2 = pm2.mutable_data_ptr<float>();
    p.pcnt = pcnt.mutable_data_ptr<float>();
    launch(p, c, t);
  };
  if (x.scalar_type() == at::kHalf) run(__half{});
  else run(__nv_bfloat16{});
  return {c.y, psum, pm2, pcnt};
}

std::string conv_bn_act_cuda_plan(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = weight.size(0);
  const at::Tensor scale = at::ones({K}, x.options().dtype(at::kFloat));
  Call c = prepare(x, weight, scale, scale, std::nullopt, stride, padding, dilation, 1);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return plan_name(prop->major, built_with_sm90a() && !force_sm80(), c.vec, gemm_m(c.g), K, prop->multiProcessorCount);
}

}  // namespace
}  // namespace conv
}  // namespace resnet_kernels

TORCH_LIBRARY_FRAGMENT(resnet_kernels, m) {
  m.def(
      "conv_bn_act_cuda(Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor? residual, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor");
  m.def(
      "conv_bn_stats_cuda(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, int groups) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("conv_bn_act_cuda_plan(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation) -> str");
}

TORCH_LIBRARY_IMPL(resnet_kernels, CUDA, m) {
  m.impl("conv_bn_act_cuda", &resnet_kernels::conv::conv_bn_act_cuda);
  m.impl("conv_bn_stats_cuda", &resnet_kernels::conv::conv_bn_stats_cuda);
  m.impl("conv_bn_act_cuda_plan", &resnet_kernels::conv::conv_bn_act_cuda_plan);
}
