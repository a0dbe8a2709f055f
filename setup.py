"""Build resnet_kernels._C: the op schemas (always) and the CUDA kernels (when nvcc is found).

Switches (environment variables):
  RESNET_KERNELS_BUILD_CUDA   "1" force the CUDA build (fail if nvcc is missing), "0" skip it,
                              unset: build CUDA sources when nvcc is found. A GPU is never required.
  RESNET_KERNELS_CUDA_ARCHS   arch list for nvcc, e.g. "8.0;9.0a" (default when no GPU is visible).
                              TORCH_CUDA_ARCH_LIST is honoured when set and this is not.
  MAX_JOBS                    parallel compile jobs (default: sized to cores and memory).
  NVCC_THREADS                nvcc --threads (default 2).
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def _log(msg):
    print(f"[resnet_kernels setup] {msg}", file=sys.stderr)


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def _real_cuda_home(nvcc):
    """The toolkit root. `nvcc` on PATH may be a wrapper script or a symlink, which makes torch
    guess CUDA_HOME wrong; nvcc itself knows its TOP when it is given something to compile."""
    def ok(root):
        return root and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))

    candidates = []
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if "TOP=" in line:
                candidates.append(os.path.realpath(line.split("TOP=", 1)[1].strip().strip('"')))
    except (OSError, subprocess.SubprocessError):
        pass
    candidates += [os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "..")),
                   "/usr/local/cuda"]
    for root in candidates:
        if ok(root):
            return root
    raise RuntimeError(f"found nvcc at {nvcc} but no CUDA toolkit root with include/cuda_runtime.h "
                       f"(tried {candidates}); set CUDA_HOME, or RESNET_KERNELS_BUILD_CUDA=0 to skip the CUDA build")


def _torch_wheel_cuda_includes():
    """The system toolkit may lack cuBLAS/cuSPARSE headers that ATen's CUDA headers include; the
    torch wheel ships them under site-packages/nvidia/*/include."""
    dirs = []
    for sp in {os.path.dirname(os.path.dirname(__import__("torch").__file__))}:
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _max_jobs():
    if "MAX_JOBS" in os.environ:
        return os.environ["MAX_JOBS"]
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    # nvcc on these sources peaks near 3 GiB per job.
    return str(max(1, min(cores, int(mem_gib // 3))))


def _extensions():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    os.environ.setdefault("MAX_JOBS", _max_jobs())
    build_cuda = os.environ.get("RESNET_KERNELS_BUILD_CUDA", "").strip()
    nvcc = _find_nvcc()
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if build_cuda == "1" and not nvcc:
        raise RuntimeError("RESNET_KERNELS_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    want_cuda = bool(nvcc) and build_cuda != "0" and bool(cu_sources)
    sources = ["csrc/ops.cpp"]
    cxx_flags = ["-O3"]  # the C++ standard is torch's choice (C++20 for torch >= 2.13)
    define_macros = []
    if not want_cuda:
        why = ("RESNET_KERNELS_BUILD_CUDA=0" if build_cuda == "0" else
               "nvcc not found" if not nvcc else "no CUDA sources")
        _log(f"building the CPU-only extension ({why}); torch and Triton backends still work")
        return [CppExtension("resnet_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                             define_macros=define_macros)], BuildExtension

    cuda_home = _real_cuda_home(nvcc)
    os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp_ext
    cpp_ext.CUDA_HOME = cuda_home  # torch resolved it at import, possibly from the wrapper
    archs = (os.environ.get("RESNET_KERNELS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
             or DEFAULT_ARCHS)
    # Without a visible GPU, torch's helper crashes when the arch list is unset.
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        nvcc_ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        toolkit = nvcc_ver.rsplit("release ", 1)[1].split(",")[0]
    except (OSError, IndexError):
        toolkit = "unknown"
    if torch.version.cuda and toolkit != "unknown" and toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise RuntimeError(
            f"the CUDA toolkit at {cuda_home} is {toolkit} but torch was built with CUDA {torch.version.cuda}; "
            "install a matching toolkit, point CUDA_HOME at one, or set RESNET_KERNELS_BUILD_CUDA=0")
    _log(f"building CUDA sources with {nvcc} (toolkit {toolkit} at {cuda_home}) for archs {archs}, "
         f"MAX_JOBS={os.environ['MAX_JOBS']}")
    from torch.utils.cpp_extension import CUDAExtension
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                  f"--threads={os.environ.get('NVCC_THREADS', '2')}"]
    define_macros += [("RESNET_KERNELS_WITH_CUDA", None),
                      ("RESNET_KERNELS_CUDA_ARCHS", f'"{archs}"')]
    ext = CUDAExtension(
        "resnet_kernels._C", sources + cu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + _torch_wheel_cuda_includes(),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        define_macros=define_macros)
    return [ext], BuildExtension


def _version():
    with open(os.path.join(ROOT, "resnet_kernels", "_version.py")) as f:
        return f.read().split("=")[1].strip().strip('"')


ext_modules, build_ext = _extensions()
setup(
    name="resnet_kernels",
    version=_version(),
    description="Fused conv + BatchNorm + residual + ReLU kernels for ResNet blocks (CUDA C++, Triton, torch)",
    packages=find_packages(include=["resnet_kernels", "resnet_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"], "bench": ["torchvision", "scikit-image", "matplotlib", "tqdm"]},
)
