"""resnet_kernels: fused convolution + BatchNorm + residual + ReLU for ResNet blocks.

    import resnet_kernels as rk
    fast = rk.convert(torchvision.models.resnet50().eval())
    rk.summary(fast)

See README.md for the backends (torch, triton, cuda) and what each replaces.
"""
from ._version import __version__


def _load_extension():
    import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

    try:
        from . import _C  # noqa: F401  (registers the op schemas and, when built with nvcc, CUDA kernels)
    except ImportError as e:
        return False, f"{type(e).__name__}: {e}"
    return True, "loaded"


_C_STATUS = _load_extension()

from . import ops  # noqa: E402  (registers implementations against the schemas)
from .backends import BackendUnavailable, available_backends  # noqa: E402
from .convert import convert, summary  # noqa: E402
from .functional import fold_bn, fused_conv_bn_act, fused_conv_bn_train  # noqa: E402
from .reference import clear_caches  # noqa: E402
from .modules import FoldedBatchNorm, FusedBasicBlock, FusedBottleneck, FusedConvBNAct  # noqa: E402

__all__ = [
    "__version__",
    "available_backends",
    "BackendUnavailable",
    "convert",
    "summary",
    "fused_conv_bn_act",
    "fused_conv_bn_train",
    "fold_bn",
    "clear_caches",
    "FusedConvBNAct",
    "FusedBasicBlock",
    "FusedBottleneck",
    "FoldedBatchNorm",
    "ops",
]
