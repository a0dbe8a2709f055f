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
