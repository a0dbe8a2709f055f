"""python -m resnet_kernels info : backends, device, versions, extension build flags."""
from __future__ import annotations

import argparse
import platform
import sys


def info(out=sys.stdout):
    import torch

    import resnet_kernels as rk
    from resnet_kernels import backends

    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"resnet_kernels {rk.__version__}  ({rk.__file__})")
    p(f"python {platform.python_version()}  torch {torch.__version__}  (built with CUDA {torch.version.cuda})")
    try:
        import triton
        p(f"triton {triton.__version__}")
    except ImportError:
        p("triton: not installed")
    if torch.cuda.is_available():
        p(f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        p(f"device: CPU only ({torch.get_num_threads()} threads); no CUDA GPU visible")
    loaded, why = rk._C_STATUS
    p(f"extension resnet_kernels._C: {'loaded' if loaded else 'NOT loaded: ' + why}")
    if loaded:
        p(f"  build: {rk.ops.build_info()}")
    p("backends (auto's order on CUDA: cuda > triton > torch; on CPU: torch):")
    for name, (ok, reason) in backends.status().items():
        p(f"  {name:7s} {'available' if ok else 'unavailable':11s} {reason}")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m resnet_kernels")
    ap.add_argument("command", choices=["info"], nargs="?", default="info")
    ap.parse_args(argv)
    return info()


if __name__ == "__main__":
    sys.exit(main())
