// bn_act_epilogue_: y = relu?(y * scale[k] + shift[k] + residual), in place, in one pass.
//
// The `torch` backend's GPU epilogue: cuDNN computes y = conv(x, W) in fp16/bf16/fp32, then this
// kernel applies BatchNorm (fp32 scale/shift per output channel k), the optional residual and
// ReLU with fp32 math, reading and writing y once. Without it the epilogue is an fp32 temporary
// and four ATen passes.
//
// y is dense, NCHW-contiguous or channels_last. The residual has y's shape and any strides.
//   channels_last: a flat loop over N*P*Q*K with k innermost; 16-byte vectors when K and the
//                  pointers allow; a residual laid out like y is read with the same vectors,
//                  any other residual element by element through its strides.
//   NCHW:          one (n, k) plane per grid row, scale/shift loaded once per plane.
// Index math is in csrc/cuda/epilogue_math.cuh (64-bit, host-testable).
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "cuda/epilogue_math.cuh"

namespace resnet_kernels {
namespace epilogue {

constexpr int kThreads = 256;

enum class Res { kNone, kDense, kStrided };  // no residual / laid out like y / any strides

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// VEC consecutive floats from p (16-byte aligned when VEC is a multiple of 4).
template <int VEC>
__device__ __forceinline__ void load_f32(const float* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int c = 0; c < VEC / 4; ++c) {
      const Pack<float, 4> f = *reinterpret_cast<const Pack<float, 4>*>(p + 4 * c);
#pragma unroll
      for (int j = 0; j < 4; ++j) out[4 * c + j] = f.v[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = p[j];
  }
}

// y and res are not __restrict__: a residual that is y itself (same strides) is allowed.
template <typename T, int VEC, Res R>
__global__ void __launch_bounds__(kThreads) bn_act_epilogue_nhwc_kernel(
    const T* src,                       // [N, P, Q, K] dense channels_last input (may be y itself)
    T* y,                               // [N, P, Q, K] dense channels_last output
    const float* __restrict__ scale,    // [K] fp32, 16-byte aligned
    const float* __restrict__ shift,    // [K] fp32, 16-byte aligned
    const T* res,                       // residual [N, K, P, Q] at strides rs, or nullptr
    Strides rs,                         // residual element strides (n, k, p, q); kStrided only
    int64_t total, int64_t K, int64_t P, int64_t Q, bool relu) {
  const int64_t nvec = total / VEC;  // VEC divides K, hence total
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += step) {
    const int64_t i = v * VEC;
    const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(src + i);
    float r[VEC];
    int64_t k0;
    if constexpr (R == Res::kStrided) {
      const Coord c = nhwc_coord(i, K, P, Q);
      k0 = c.k;
      const int64_t base = offset(c, rs);
#pragma unroll
      for (int j = 0; j < VEC; ++j) r[j] = static_cast<float>(res[base + j * rs.k]);
    } else {
      int64_t pixel;
      divmod(i, K, pixel, k0);
      if constexpr (R == Res::kDense) {
        const Pack<T, VEC> rv = *reinterpret_cast<const Pack<T, VEC>*>(res + i);
#pragma unroll
        for (int j = 0; j < VEC; ++j) r[j] = static_cast<float>(rv.v[j]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) r[j] = 0.f;
      }
    }
    float sc[VEC], sh[VEC];
    load_f32<VEC>(scale + k0, sc);
    load_f32<VEC>(shift + k0, sh);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<T>(bn_act(static_cast<float>(in.v[j]), sc[j], sh[j], r[j], relu));
    *reinterpret_cast<Pack<T, VEC>*>(y + i) = out;
  }
}

template <typename T, int VEC, Res R>
__global__ void __launch_bounds__(kThreads) bn_act_epilogue_nchw_kernel(
    const T* src,                       // [N, K, P, Q] dense NCHW input (may be y itself)
    T* y,                               // [N, K, P, Q] dense NCHW output
    const float* __restrict__ scale,    // [K] fp32
    const float* __restrict__ shift,    // [K] fp32
    const T* res,                       // residual [N, K, P, Q] at strides rs, or nullptr
    Strides rs,                         // residual element strides (n, k, p, q); kStrided only
    int64_t planes, int64_t K, int64_t PQ, int64_t Q, bool relu) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    int64_t n, k;
    plane_coord(plane, K, n, k);
    const float sc = scale[k], sh = shift[k];
    T* yp = y + plane * PQ;
    const T* sp = src + plane * PQ;
    const T* rp = R == Res::kDense ? res + plane * PQ : R == Res::kStrided ? res + n * rs.n + k * rs.k : nullptr;
    for (int64_t j = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; j < PQ; j += step) {
      const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(sp + j);  // VEC divides PQ
      float r[VEC];
      if constexpr (R == Res::kDense) {
        const Pack<T, VEC> rv = *reinterpret_cast<const Pack<T, VEC>*>(rp + j);
#pragma unroll
        for (int e = 0; e < VEC; ++e) r[e] = static_cast<float>(rv.v[e]);
      } else if constexpr (R == Res::kStrided) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {  // a vector may cross a row of the plane
          int64_t p, q;
          pixel_coord(j + e, Q, p, q);
          r[e] = static_cast<float>(rp[p * rs.p + q * rs.q]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) r[e] = 0.f;
      }
      Pack<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) out.v[e] = static_cast<T>(bn_act(static_cast<float>(in.v[e]), sc, sh, r[e], relu));
      *reinterpret_cast<Pack<T, VEC>*>(yp + j) = out;
    }
  }
}

namespace {

struct Launch {
  bool nhwc;
  int64_t N, K, P, Q;
  Strides rs;
  bool relu;
  int sms;
  cudaStream_t stream;
};

template <typename T, int VEC, Res R>
void launch(const Launch& L, const T* src, T* y, const float* scale, const float* shift, const T* res) {
  if (L.nhwc) {
    const int64_t total = L.N * L.K * L.P * L.Q;
    const int64_t nvec = total / VEC;
    // A grid-stride loop over at most ~4 waves of full occupancy.
    const int64_t max_blocks = static_cast<int64_t>(L.sms) * (2048 / kThreads) * 4;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((nvec + kThreads - 1) / kThreads, max_blocks));
    bn_act_epilogue_nhwc_kernel<T, VEC, R><<<static_cast<unsigned>(blocks), kThreads, 0, L.stream>>>(
        src, y, scale, shift, res, L.rs, total, L.K, L.P, L.Q, L.relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t planes = L.N * L.K, PQ = L.P * L.Q;
    const int64_t per_plane = PQ / VEC;
    // Small planes (7x7) get small blocks so few threads idle; rows of the grid walk the planes.
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (per_plane + 31) / 32 * 32)));
    const int64_t gx = std::min<int64_t>((per_plane + threads - 1) / threads, static_cast<int64_t>(L.sms) * 8);
    const int64_t gy = std::min<int64_t>(planes, 65535);
    const dim3 grid(static_cast<unsigned>(std::max<int64_t>(gx, 1)), static_cast<unsigned>(gy));
    bn_act_epilogue_nchw_kernel<T, VEC, R><<<grid, threads, 0, L.stream>>>(
        src, y, scale, shift, res, L.rs, planes, L.K, PQ, L.Q, L.relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int VEC>
void launch_res(const Launch& L, Res mode, const T* src, T* y, const float* scale, const float* shift,
                const T* res) {
  switch (mode) {
    case Res::kNone: return launch<T, VEC, Res::kNone>(L, src, y, scale, shift, res);
    case Res::kDense: return launch<T, VEC, Res::kDense>(L, src, y, scale, shift, res);
    case Res::kStrided: return launch<T, VEC, Res::kStrided>(L, src, y, scale, shift, res);
  }
}

void check_param(const at::Tensor& t, const char* name, const at::Tensor& y) {
  const int64_t K = y.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == K, "bn_act_epilogue_: ", name,
              " must be a 1-D tensor of y's K=", K, " channels, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "bn_act_epilogue_: ", name,
              " must be float32 (BN constants stay in full precision), got ", t.scalar_type());
  TORCH_CHECK(t.device() == y.device(), "bn_act_epilogue_: ", name, " must be on y's device ", y.device(),
              ", got ", t.device());
  at::assert_no_overlap(y, t);
}

// 16-byte aligned fp32 copy of a scale/shift vector (a fresh allocation is; a view may not be).
at::Tensor aligned_f32(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// out = relu?(src * scale + shift + residual); out is src itself (in place) or a fresh tensor shaped
// and laid out like src.
void apply(const at::Tensor& src, const at::Tensor& out, const at::Tensor& scale, const at::Tensor& shift,
           const std::optional<at::Tensor>& residual, bool relu) {
  const at::Tensor& y = src;
  TORCH_CHECK(y.dim() == 4, "bn_act_epilogue_: y must be a 4-D tensor [N, K, P, Q], got ", y.dim(), "-D of shape ",
              y.sizes());
  TORCH_CHECK(y.is_cuda(), "bn_act_epilogue_: y must be a CUDA tensor, got one on ", y.device());
  const auto dtype = y.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "bn_act_epilogue_: y must be float32, float16 or bfloat16, got ", dtype);
  const bool is_nchw = y.is_contiguous();
  const bool is_nhwc = y.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(is_nchw || is_nhwc,
              "bn_act_epilogue_: y must be dense in NCHW-contiguous or channels_last memory format "
              "(it is updated in place), got shape ",
              y.sizes(), " with strides ", y.strides());
  check_param(scale, "scale", y);
  check_param(shift, "shift", y);
  const at::Tensor* res = nullptr;
  if (residual.has_value() && residual->defined()) {
    res = &*residual;
    TORCH_CHECK(res->sizes() == y.sizes(), "bn_act_epilogue_: residual must have y's shape ", y.sizes(), ", got ",
                res->sizes());
    TORCH_CHECK(res->scalar_type() == dtype, "bn_act_epilogue_: residual must have y's dtype ", dtype, ", got ",
                res->scalar_type());
    TORCH_CHECK(res->device() == y.device(), "bn_act_epilogue_: residual must be on y's device ", y.device(),
                ", got ", res->device());
    // Same memory with y's strides is fine (each element is read before it is written by the
    // same thread); a partial overlap is not.
    at::assert_no_partial_overlap(y, *res);
  }
  if (y.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor sc = aligned_f32(scale), sh = aligned_f32(shift);

  // Where both layouts hold (K == 1 or P*Q == 1) they address memory identically: take the flat
  // channels_last loop.
  Launch L;
  L.nhwc = is_nhwc;
  L.N = y.size(0);
  L.K = y.size(1);
  L.P = y.size(2);
  L.Q = y.size(3);
  L.relu = relu;
  L.sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  L.stream = at::cuda::getCurrentCUDAStream();
  const auto fmt = L.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  Res mode = Res::kNone;
  L.rs = Strides{0, 0, 0, 0};
  if (res != nullptr) {
    mode = res->is_contiguous(fmt) ? Res::kDense : Res::kStrided;
    L.rs = Strides{res->stride(0), res->stride(1), res->stride(2), res->stride(3)};
  }
  uint64_t addr_bits = reinterpret_cast<uintptr_t>(y.data_ptr()) | reinterpret_cast<uintptr_t>(out.data_ptr());
  if (mode == Res::kDense) addr_bits |= reinterpret_cast<uintptr_t>(res->data_ptr());
  const int64_t inner = L.nhwc ? L.K : L.P * L.Q;
  const int vec = vector_width(inner, static_cast<int>(y.element_size()), addr_bits);

  auto run = [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const T* sp = y.const_data_ptr<T>();
    T* yp = out.mutable_data_ptr<T>();
    const T* rp = res != nullptr ? res->const_data_ptr<T>() : nullptr;
    const float* scp = sc.const_data_ptr<float>();
    const float* shp = sh.const_data_ptr<float>();
    if (vec == kVec) {
      launch_res<T, kVec>(L, mode, sp, yp, scp, shp, rp);
    } else {
      launch_res<T, 1>(L, mode, sp, yp, scp, shp, rp);
    }
  };
  AT_DISPATCH_SWITCH(dtype, "bn_act_epilogue_",
                     AT_DISPATCH_CASE(at::kFloat, [&] { run(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { run(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { run(scalar_t{}); }));
}

void bn_act_epilogue_cuda(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                          const std::optional<at::Tensor>& residual, bool relu) {
  apply(y, y, scale, shift, residual, relu);
}

// Out of place (the training forward keeps the conv output y for the backward pass): one read of
// y (+ residual), one write of out, in y's memory format.
at::Tensor bn_act_apply_cuda(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                             const std::optional<at::Tensor>& residual, bool relu) {
  TORCH_CHECK(y.dim() == 4, "bn_act_apply_cuda: y must be a 4-D tensor [N, K, P, Q], got shape ", y.sizes());
  const auto fmt = y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous()
                       ? at::MemoryFormat::ChannelsLast
                       : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty(y.sizes(), y.options().memory_format(fmt));
  apply(y, out, scale, shift, residual, relu);
  return out;
}

}  // namespace
}  // namespace epilogue
}  // namespace resnet_kernels

TORCH_LIBRARY_FRAGMENT(resnet_kernels, m) {
  m.def("bn_act_apply_cuda(Tensor y, Tensor scale, Tensor shift, Tensor? residual, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(resnet_kernels, CUDA, m) {
  m.impl("bn_act_epilogue_", &resnet_kernels::epilogue::bn_act_epilogue_cuda);
  m.impl("bn_act_apply_cuda", &resnet_kernels::epilogue::bn_act_apply_cuda);
}
