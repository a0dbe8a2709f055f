// Op schemas of resnet_kernels: the one place each op's signature is defined.
//
// Backends register implementations against these schemas: the torch and Triton backends from
// Python (resnet_kernels/ops.py registers CPU/CUDA impls, the fake kernel, autograd and
// autocast), the hand-written CUDA kernels from csrc/cuda/*.cu with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

// Importing resnet_kernels._C must give Python a module object even though every op is
// registered through the static TORCH_LIBRARY initialisers below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "resnet_kernels op schemas", -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(resnet_kernels, m) {
  // y = act(conv(x, weight) * scale[k] + shift[k] + residual); scale/shift fp32 [K];
  // residual optional, any strides, output's shape. `backend` is a concrete backend name
  // ("torch", "triton", "cuda"); "auto" is resolved in Python before the op is called.
  m.def(
      "conv_bn_act(Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor? residual, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, str backend) -> Tensor");
  m.def("bn_act_epilogue_(Tensor(a!) y, Tensor scale, Tensor shift, Tensor? residual, bool relu) -> ()");
  // Training (BN with batch statistics). Forward: y = conv(x, weight) (x's dtype), its per-channel
  // mean and biased variance (fp32; fp64 for fp64 x), and out = act((y - mean) * rsqrt(var + eps)
  // * gamma + beta + residual). gamma/beta None mean affine=False.
  m.def(
      "conv_bn_train(Tensor x, Tensor weight, Tensor? gamma, Tensor? beta, Tensor? residual, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, float eps, bool relu, str backend) "
      "-> (Tensor out, Tensor y, Tensor mean, Tensor var)");
  // Backward of the BN + residual + ReLU part: one reduction (sum of gz and gz * y_hat per channel)
  // and one elementwise pass (dy). Returns (dy, dgamma, dbeta); the residual's gradient is gz.
  m.def(
      "bn_act_train_backward(Tensor grad, Tensor out, Tensor y, Tensor mean, Tensor var, Tensor? gamma, "
      "float eps, bool relu, str backend) -> (Tensor dy, Tensor gz, Tensor dgamma, Tensor dbeta)");
  // nn.BatchNorm2d's running-statistics update (momentum=None: cumulative average over
  // num_batches_tracked, which is incremented first). count = values per channel (N*H*W).
  m.def(
      "bn_update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, "
      "Tensor mean, Tensor var, int count, float? momentum) -> ()");
}

// Build-time facts that `python -m resnet_kernels info` reports.
TORCH_LIBRARY_FRAGMENT(resnet_kernels, m) {
  m.def("build_info() -> str", []() -> std::string {
    std::string info = "cxx=" + std::to_string(__cplusplus);
#ifdef RESNET_KERNELS_WITH_CUDA
    info += ";cuda=1";
#else
    info += ";cuda=0";
#endif
#ifdef RESNET_KERNELS_CUDA_ARCHS
    info += ";archs=" RESNET_KERNELS_CUDA_ARCHS;
#endif
    return info;
  });
}
