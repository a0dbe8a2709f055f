"""Build resnet_kernels._C: the op schemas (always) and the CUDA kernels (when nvcc is found).

Switches (environment variables):
  RESNET_KERNELS_BUILD_CUDA   "1" force the CUDA build (fail if nvcc is missing), "0" skip it,
                              unset: build CUDA sources when nvcc is found. A GPU is never required.
  RESNET_KERNELS_CUDA_ARCHS   arch list for nvcc, e.g. "8.0;9.0a" (default when no GPU is visible).
                              TORCH_CUDA_ARCH_LIST is honoured when set and this is not.
  MAX_JOBS                    parallel compile jobs (default: sized to cores and memory).
  NVCC_THREADS                nvcc --threads (default 2).
  RESNET_KERNELS_LOCAL_VERSION  "1" (or "auto") appends a local version naming what the binary was
                              built for, e.g. 0.1.0+cu130torch2.14 (CUDA kernels) or 0.1.0+cputorch2.14,
                              and pins torch to that minor release; any other non-empty value except
                              "0" is used as the local label as given. Unset (default): plain version,
                              as editable installs and the sdist want.
  RESNET_KERNELS_PY_LIMITED_API  "1" (default where torch supports it) builds _C against Python's
                              stable ABI (one cp310-abi3 wheel for every CPython >= 3.10); "0" builds
                              a version-specific module. Off on free-threaded Pythons (no abi3 there).
"""
import glob
import inspect
import os
import re
import shutil
import subprocess
import sys
import sysconfig

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


def _check_toolkit_matches_torch(toolkit, torch_cuda, cuda_home, nvcc):
    """The kernels link against the CUDA runtime that torch ships, so nvcc must be of torch's CUDA
    major version; a minor difference builds, with a warning saying what it risks."""
    if toolkit == "unknown":
        _log(f"could not read the CUDA version from `{nvcc} --version`; assuming it matches torch's CUDA {torch_cuda}")
        return
    tk = tuple(int(v) for v in toolkit.split(".")[:2])
    tc = tuple(int(v) for v in torch_cuda.split(".")[:2])
    if tk[0] != tc[0]:
        raise RuntimeError(
            f"CUDA toolkit/torch mismatch: nvcc at {nvcc} (toolkit root {cuda_home}) is CUDA {toolkit}, but the "
            f"installed torch was built with CUDA {torch_cuda}. Kernels built by one major version cannot link "
            f"against the other's runtime. Fix one of: install CUDA toolkit {tc[0]}.x and set CUDA_HOME to it; "
            f"install a torch built for CUDA {tk[0]}.x; or set RESNET_KERNELS_BUILD_CUDA=0 to build without the "
            "CUDA kernels (the torch and Triton backends still work)")
    if tk > tc:
        _log(f"WARNING: CUDA toolkit {toolkit} is newer than torch's CUDA {torch_cuda}: the build may use CUDA "
             f"runtime symbols that torch's bundled runtime {torch_cuda} lacks (an import error at load time). "
             f"A toolkit {torch_cuda} (set CUDA_HOME) is the safe choice")
    elif tk < tc:
        _log(f"note: CUDA toolkit {toolkit} is older than torch's CUDA {torch_cuda}; fine "
             "(minor-version compatibility)")


def _limited_api_kwargs():
    """Build _C against Python's stable ABI when possible. _C itself uses only PyModule_Create from
    Python's C API (the ops register through the dispatcher, no pybind11 / libtorch_python), so a
    cp310-abi3 module serves every CPython >= 3.10. torch >= 2.6 knows py_limited_api (it then
    defines Py_LIMITED_API and does not link libtorch_python)."""
    from torch.utils import cpp_extension

    want = os.environ.get("RESNET_KERNELS_PY_LIMITED_API", "1").strip()
    if want == "0":
        return {}
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        _log("free-threaded Python: building a version-specific _C (abi3 is not available here)")
        return {}
    try:
        supported = "py_limited_api" in inspect.getsource(cpp_extension.CppExtension)
    except (OSError, TypeError):  # no source shipped: torch >= 2.6 has it
        import torch

        supported = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)
    if not supported:
        _log("this torch predates py_limited_api support in its extension builder: version-specific _C")
        return {}
    return {"py_limited_api": True}


def _limited_api_tag():
    """The wheel's Python tag: the CPython whose limited API torch compiles against (it defines
    Py_LIMITED_API=min_supported_cpython), e.g. 0x030A0000 -> cp310."""
    from torch.utils import cpp_extension

    v = int(str(getattr(cpp_extension, "min_supported_cpython", "0x030A0000")), 16)
    return f"cp{(v >> 24) & 0xFF}{(v >> 16) & 0xFF}"


def _extensions():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    os.environ.setdefault("MAX_JOBS", _max_jobs())
    build_cuda = os.environ.get("RESNET_KERNELS_BUILD_CUDA", "").strip()
    nvcc = _find_nvcc()
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if build_cuda == "1" and not nvcc:
        raise RuntimeError("RESNET_KERNELS_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if build_cuda == "1" and not torch.version.cuda:
        raise RuntimeError(
            f"RESNET_KERNELS_BUILD_CUDA=1 but the installed torch {torch.__version__} was built without CUDA "
            "(torch.version.cuda is None); the CUDA kernels link against torch's CUDA libraries: install a "
            "CUDA build of torch, or unset RESNET_KERNELS_BUILD_CUDA")
    if nvcc and build_cuda != "0" and not torch.version.cuda:
        _log(f"nvcc found at {nvcc} but torch {torch.__version__} has no CUDA; skipping the CUDA kernels")
        nvcc = None
    want_cuda = bool(nvcc) and build_cuda != "0" and bool(cu_sources)
    sources = ["csrc/ops.cpp"]
    cxx_flags = ["-O3"]  # the C++ standard is torch's choice (C++20 for torch >= 2.13)
    define_macros = []
    if not want_cuda:
        why = ("RESNET_KERNELS_BUILD_CUDA=0" if build_cuda == "0" else
               "nvcc not found" if not nvcc else "no CUDA sources")
        _log(f"building the CPU-only extension ({why}); torch and Triton backends still work")
        return [CppExtension("resnet_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                             define_macros=define_macros, **_limited_api_kwargs())], BuildExtension, False

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
    _check_toolkit_matches_torch(toolkit, torch.version.cuda, cuda_home, nvcc)
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
        define_macros=define_macros, **_limited_api_kwargs())
    return [ext], BuildExtension, True


def _version():
    with open(os.path.join(ROOT, "resnet_kernels", "_version.py")) as f:
        return f.read().split("=")[1].strip().strip('"')


def _local_label(with_cuda):
    """The PEP 440 local label of a binary wheel, or None (see RESNET_KERNELS_LOCAL_VERSION)."""
    import torch

    want = os.environ.get("RESNET_KERNELS_LOCAL_VERSION", "").strip().lower()
    if want in ("", "0"):
        return None
    if want in ("1", "auto"):
        major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
        cuda = "cu" + torch.version.cuda.replace(".", "") if with_cuda else "cpu"
        return f"{cuda}torch{major_minor}"
    if not re.fullmatch(r"[a-z0-9]+(\.[a-z0-9]+)*", want):
        raise RuntimeError(f"RESNET_KERNELS_LOCAL_VERSION={want!r} is not a PEP 440 local version label "
                           "(letters and digits separated by dots), nor 0/1/auto")
    return want


def _install_requires(label):
    """A binary built for a local label is tied to torch's minor release (libtorch has no stable C++
    ABI), so its wheel says so; source installs build against whatever torch is there."""
    if label is None:
        return ["torch>=2.4", "numpy"]
    import torch

    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return [f"torch>={major}.{minor},<{major}.{minor + 1}", "numpy"]


def _cmdclass(build_ext_base):
    base = build_ext_base.with_options(use_ninja=True)

    class build_ext(base):
        def run(self):
            super().run()
            if self.inplace:
                self._remove_stale_inplace_modules()

        def _remove_stale_inplace_modules(self):
            # Python prefers _C.cpython-3XY-*.so over _C.abi3.so: a module left in the tree by an
            # earlier build of the other kind would shadow the one just built.
            for ext in self.extensions:
                built = os.path.join(ROOT, self.get_ext_filename(ext.name))
                stem = os.path.join(os.path.dirname(built), ext.name.rsplit(".", 1)[-1])
                for old in glob.glob(stem + ".*.so") + glob.glob(stem + ".so"):
                    if os.path.abspath(old) != os.path.abspath(built) and os.path.exists(built):
                        _log(f"removing {os.path.relpath(old, ROOT)}: superseded by {os.path.relpath(built, ROOT)}")
                        os.remove(old)

    return {"build_ext": build_ext}


ext_modules, build_ext, with_cuda = _extensions()
label = _local_label(with_cuda)
if label and "sdist" in sys.argv[1:]:
    _log(f"ignoring the local version label +{label} for the sdist: an sdist is built where it is installed")
    label = None
version = _version() + (f"+{label}" if label else "")
if label:
    _log(f"wheel version {version}")
limited = bool(ext_modules) and all(getattr(e, "py_limited_api", False) for e in ext_modules)
setup(
    name="resnet_kernels",
    version=version,
    description="Fused conv + BatchNorm + residual + ReLU kernels for ResNet blocks (CUDA C++, Triton, torch)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["resnet_kernels", "resnet_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=_cmdclass(build_ext),
    options={"bdist_wheel": {"py_limited_api": _limited_api_tag()}} if limited else {},
    python_requires=">=3.10",
    install_requires=_install_requires(label),
    extras_require={"triton": ["triton"], "bench": ["torchvision", "scikit-image", "matplotlib", "tqdm"]},
)
