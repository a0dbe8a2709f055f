"""Every distinct fused conv_bn_act shape of torchvision ResNet-18/34/50/101, derived from the models.

    python benchmarks/shapes.py                 # the table (name, geometry, where it occurs)

Each torchvision model is built on the meta device (no memory, no weights) and run on a meta
input of 3 x size x size; a forward hook on every Conv2d records its input's spatial size. Each
convolution is then classified by where it sits, which decides the fused op's epilogue:

    stem        conv1 of the model            -> bn1 -> relu             relu, no residual
    conv1/conv2 of a Bottleneck, conv1 of a BasicBlock   -> bn -> relu    relu, no residual
    last conv   conv2 of a BasicBlock, conv3 of a Bottleneck -> bn (+ shortcut) -> relu
                                                                          relu, residual
    downsample  the shortcut's 1x1 conv -> bn                            no relu, no residual

Shapes that coincide (same C, K, filter, stride, padding, input size and epilogue) across layers
and models are listed once, with every place they occur and how often per model, so a reader
can weight a per-shape speedup by how much of a model it is.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101")


@dataclass
class ConvShape:
    """One fused conv_bn_act geometry (square filters and inputs, groups=1, dilation=1: what
    torchvision's ResNets use)."""

    c: int                      # input channels
    k: int                      # output channels
    h: int                      # input height = width
    r: int                      # filter size (r x r)
    stride: int
    padding: int
    relu: bool
    residual: bool
    role: str                   # stem | block_conv | block_last | downsample
    where: list = field(default_factory=list)    # ["resnet50.layer2.0.conv2", ...]
    count: dict = field(default_factory=dict)    # {"resnet50": 4, ...} occurrences per model

    @property
    def p(self):
        """Output height = width."""
        return (self.h + 2 * self.padding - self.r) // self.stride + 1

    @property
    def key(self):
        return (self.c, self.k, self.h, self.r, self.stride, self.padding, self.relu, self.residual)

    @property
    def name(self):
        """Short unique label: role, filter, stride, channels, input size, epilogue."""
        s = f"s{self.stride}" if self.stride != 1 else ""
        epi = "+res" if self.residual else ("" if self.relu else " norelu")
        role = {"stem": "stem", "block_conv": "conv", "block_last": "last", "downsample": "ds"}[self.role]
        return f"{role} {self.r}x{self.r}{s} {self.c}->{self.k}{epi} @{self.h}"

    def flops(self, n):
        """Counted FLOPs of one call at batch n: 2 per multiply-add of the convolution, plus the
        epilogue per output element (scale and shift: 2, residual add: 1, ReLU: 1)."""
        outs = n * self.k * self.p * self.p
        return 2 * outs * self.c * self.r * self.r + outs * (2 + int(self.residual) + int(self.relu))

    def min_bytes(self, n, esize):
        """Minimum memory traffic of one call: read x, weight, residual and the fp32 scale/shift
        once, write y once (esize: bytes per element of x, weight, residual, y)."""
        x = n * self.c * self.h * self.h
        w = self.k * self.c * self.r * self.r
        y = n * self.k * self.p * self.p
        return (x + w + y * (2 if self.residual else 1)) * esize + 2 * self.k * 4


def _role(qualname, block_kinds):
    """(role, relu, residual) of the conv at `qualname` (e.g. layer2.0.conv2, layer2.0.downsample.0)."""
    parts = qualname.split(".")
    if len(parts) == 1:
        return "stem", True, False
    if "downsample" in parts:
        return "downsample", False, False
    block = ".".join(parts[:-1])
    last = {"BasicBlock": "conv2", "Bottleneck": "conv3"}[block_kinds[block]]
    return ("block_last", True, True) if parts[-1] == last else ("block_conv", True, False)


def model_convs(model_name, size=224):
    """[(qualified name, ConvShape)] of every conv of a torchvision ResNet, in forward order."""
    import torch
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, model_name)(weights=None)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()
             if type(m).__name__ in ("BasicBlock", "Bottleneck")}
    seen = []

    def hook(name):
        def fn(mod, args):
            x = args[0]
            if mod.groups != 1 or mod.dilation != (1, 1) or x.shape[2] != x.shape[3] or \
                    mod.kernel_size[0] != mod.kernel_size[1] or mod.stride[0] != mod.stride[1]:
                raise ValueError(f"{model_name}.{name}: not a square, ungrouped, undilated conv")
            role, relu, residual = _role(name, kinds)
            seen.append((name, ConvShape(mod.in_channels, mod.out_channels, int(x.shape[2]), mod.kernel_size[0],
                                         mod.stride[0], mod.padding[0], relu, residual, role)))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, 3, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return seen


def resnet_shapes(models=MODELS, size=224):
    """Distinct ConvShapes over the models, in first-seen order, each with where/count filled in.

    Derived from torchvision; where torchvision is not installed (e.g. a bare GPU machine), the
    default models at 224x224 come from FROZEN (tests/test_bench_shapes.py keeps it equal to the
    derived list) and `where` stays empty."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        if tuple(models) != MODELS or size != 224:
            raise
        return frozen_shapes()
    out = {}
    for model_name in models:
        for qualname, s in model_convs(model_name, size):
            shape = out.setdefault(s.key, s)
            shape.where.append(f"{model_name}.{qualname}")
            shape.count[model_name] = shape.count.get(model_name, 0) + 1
    return list(out.values())


# resnet_shapes() of MODELS at 224x224: (C, K, H, R, stride, padding, relu, residual, role, {model: count}).
FROZEN = (
    (3, 64, 224, 7, 2, 3, 1, 0, 'stem',
     {'resnet18': 1, 'resnet34': 1, 'resnet50': 1, 'resnet101': 1}),
    (64, 64, 56, 3, 1, 1, 1, 0, 'block_conv',
     {'resnet18': 2, 'resnet34': 3, 'resnet50': 3, 'resnet101': 3}),
    (64, 64, 56, 3, 1, 1, 1, 1, 'block_last',
     {'resnet18': 2, 'resnet34': 3}),
    (64, 128, 56, 3, 2, 1, 1, 0, 'block_conv',
     {'resnet18': 1, 'resnet34': 1}),
    (128, 128, 28, 3, 1, 1, 1, 1, 'block_last',
     {'resnet18': 2, 'resnet34': 4}),
    (64, 128, 56, 1, 2, 0, 0, 0, 'downsample',
     {'resnet18': 1, 'resnet34': 1}),
    (128, 128, 28, 3, 1, 1, 1, 0, 'block_conv',
     {'resnet18': 1, 'resnet34': 3, 'resnet50': 3, 'resnet101': 3}),
    (128, 256, 28, 3, 2, 1, 1, 0, 'block_conv',
     {'resnet18': 1, 'resnet34': 1}),
    (256, 256, 14, 3, 1, 1, 1, 1, 'block_last',
     {'resnet18': 2, 'resnet34': 6}),
    (128, 256, 28, 1, 2, 0, 0, 0, 'downsample',
     {'resnet18': 1, 'resnet34': 1}),
    (256, 256, 14, 3, 1, 1, 1, 0, 'block_conv',
     {'resnet18': 1, 'resnet34': 5, 'resnet50': 5, 'resnet101': 22}),
    (256, 512, 14, 3, 2, 1, 1, 0, 'block_conv',
     {'resnet18': 1, 'resnet34': 1}),
    (512, 512, 7, 3, 1, 1, 1, 1, 'block_last',
     {'resnet18': 2, 'resnet34': 3}),
    (256, 512, 14, 1, 2, 0, 0, 0, 'downsample',
     {'resnet18': 1, 'resnet34': 1}),
    (512, 512, 7, 3, 1, 1, 1, 0, 'block_conv',
     {'resnet18': 1, 'resnet34': 2, 'resnet50': 2, 'resnet101': 2}),
    (64, 64, 56, 1, 1, 0, 1, 0, 'block_conv',
     {'resnet50': 1, 'resnet101': 1}),
    (64, 256, 56, 1, 1, 0, 1, 1, 'block_last',
     {'resnet50': 3, 'resnet101': 3}),
    (64, 256, 56, 1, 1, 0, 0, 0, 'downsample',
     {'resnet50': 1, 'resnet101': 1}),
    (256, 64, 56, 1, 1, 0, 1, 0, 'block_conv',
     {'resnet50': 2, 'resnet101': 2}),
    (256, 128, 56, 1, 1, 0, 1, 0, 'block_conv',
     {'resnet50': 1, 'resnet101': 1}),
    (128, 128, 56, 3, 2, 1, 1, 0, 'block_conv',
     {'resnet50': 1, 'resnet101': 1}),
    (128, 512, 28, 1, 1, 0, 1, 1, 'block_last',
     {'resnet50': 4, 'resnet101': 4}),
    (256, 512, 56, 1, 2, 0, 0, 0, 'downsample',
     {'resnet50': 1, 'resnet101': 1}),
    (512, 128, 28, 1, 1, 0, 1, 0, 'block_conv',
     {'resnet50': 3, 'resnet101': 3}),
    (512, 256, 28, 1, 1, 0, 1, 0, 'block_conv',
     {'resnet50': 1, 'resnet101': 1}),
    (256, 256, 28, 3, 2, 1, 1, 0, 'block_conv',
     {'resnet50': 1, 'resnet101': 1}),
    (256, 1024, 14, 1, 1, 0, 1, 1, 'block_last',
     {'resnet50': 6, 'resnet101': 23}),
    (512, 1024, 28, 1, 2, 0, 0, 0, 'downsample',
     {'resnet50': 1, 'resnet101': 1}),
    (1024, 256, 14, 1, 1, 0, 1, 0, 'block_conv',
     {'resnet50': 5, 'resnet101': 22}),
    (1024, 512, 14, 1, 1, 0, 1, 0, 'block_conv',
     {'resnet50': 1, 'resnet101': 1}),
    (512, 512, 14, 3, 2, 1, 1, 0, 'block_conv',
     {'resnet50': 1, 'resnet101': 1}),
    (512, 2048, 7, 1, 1, 0, 1, 1, 'block_last',
     {'resnet50': 3, 'resnet101': 3}),
    (1024, 2048, 14, 1, 2, 0, 0, 0, 'downsample',
     {'resnet50': 1, 'resnet101': 1}),
    (2048, 512, 7, 1, 1, 0, 1, 0, 'block_conv',
     {'resnet50': 2, 'resnet101': 2}),
)


def frozen_shapes():
    return [ConvShape(c, k, h, r, st, pad, bool(relu), bool(res), role, count=dict(cnt))
            for c, k, h, r, st, pad, relu, res, role, cnt in FROZEN]


@dataclass
class BlockShape:
    """One whole residual block (torchvision BasicBlock / Bottleneck, eval mode) at its input size."""

    kind: str                   # BasicBlock | Bottleneck
    inplanes: int
    planes: int
    out: int                    # output channels (planes x expansion)
    h: int                      # input height = width
    stride: int
    downsample: bool
    convs: list = field(default_factory=list)    # ConvShapes of its convs (conv1, conv2, (conv3), downsample)
    where: list = field(default_factory=list)
    count: dict = field(default_factory=dict)

    @property
    def p(self):
        return self.convs[-1].p if self.convs else self.h // self.stride

    @property
    def key(self):
        return (self.kind, self.inplanes, self.planes, self.h, self.stride, self.downsample)

    @property
    def name(self):
        s = " s2" if self.stride == 2 else ""
        return f"{self.kind} {self.inplanes}->{self.out}{s} @{self.h}"

    def flops(self, n):
        """Counted FLOPs: the sum over its fused conv_bn_act ops (ConvShape.flops)."""
        return sum(c.flops(n) for c in self.convs)

    def min_bytes(self, n, esize):
        """A whole-block floor: read x and every weight (+ fp32 scale/shift), write y once; the
        intermediate activations are not counted (a block fused end to end would keep them on chip)."""
        x = n * self.inplanes * self.h * self.h
        y = n * self.out * self.p * self.p
        w = sum(c.k * c.c * c.r * c.r for c in self.convs)
        return (x + y + w) * esize + sum(2 * c.k * 4 for c in self.convs)

    def build(self):
        """A fresh torchvision block of this shape (random weights; BN statistics are the caller's)."""
        import torch.nn as nn
        from torchvision.models.resnet import BasicBlock, Bottleneck

        cls = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}[self.kind]
        ds = None
        if self.downsample:
            ds = nn.Sequential(nn.Conv2d(self.inplanes, self.out, 1, self.stride, bias=False), nn.BatchNorm2d(self.out))
        return cls(self.inplanes, self.planes, self.stride, ds)


def resnet_blocks(models=MODELS, size=224):
    """Distinct residual blocks of the models (first-seen order), with their convs, where and count.
    Needs torchvision."""
    import torch
    import torchvision

    out = {}
    for model_name in models:
        convs = dict(model_convs(model_name, size))
        with torch.device("meta"):
            model = getattr(torchvision.models, model_name)(weights=None)
        for name, m in model.named_modules():
            kind = type(m).__name__
            if kind not in ("BasicBlock", "Bottleneck"):
                continue
            mine = [c for q, c in convs.items() if q.startswith(name + ".")]
            b = BlockShape(kind, mine[0].c, m.conv1.out_channels, mine[-1].k if m.downsample is None else
                           m.downsample[0].out_channels, mine[0].h, m.stride, m.downsample is not None, convs=mine)
            block = out.setdefault(b.key, b)
            block.where.append(f"{model_name}.{name}")
            block.count[model_name] = block.count.get(model_name, 0) + 1
    return list(out.values())


QUICK_BLOCKS = ("BasicBlock 64->64 @56", "Bottleneck 256->512 s2 @56", "Bottleneck 1024->1024 @14")


# A subset for --quick runs: one of each role and stage, small to large spatial sizes, both block
# families (the BasicBlock 3x3s and the Bottleneck 1x1s).
QUICK = (
    "stem 7x7s2 3->64 @224",
    "conv 3x3 64->64 @56",
    "last 1x1 64->256+res @56",
    "conv 3x3s2 128->128 @56",
    "last 3x3 128->128+res @28",
    "ds 1x1s2 512->1024 norelu @28",
    "conv 3x3 256->256 @14",
    "last 3x3 512->512+res @7",
)


def quick_shapes(shapes):
    by_name = {s.name: s for s in shapes}
    missing = [n for n in QUICK if n not in by_name]
    if missing:
        raise RuntimeError(f"quick shapes not found among the derived shapes: {missing}")
    return [by_name[n] for n in QUICK]


def main():
    shapes = resnet_shapes()
    rows = [(s.name, s.c, s.k, s.h, s.p, f"{s.r}x{s.r}", s.stride, s.padding, int(s.relu), int(s.residual),
             " ".join(f"{m}:{n}" for m, n in s.count.items()), f"{s.flops(1) / 1e9:.3f}")
            for s in shapes]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import format_table
    print(format_table(rows, ("shape", "C", "K", "H", "P", "filter", "stride", "pad", "relu", "res", "occurs",
                              "GFLOP @N=1"), aligns=["<"] + [">"] * 9 + ["<", ">"]))
    print(f"\n{len(shapes)} distinct conv_bn_act shapes in {', '.join(MODELS)} at 224x224")


if __name__ == "__main__":
    main()
