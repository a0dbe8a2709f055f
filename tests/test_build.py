"""Build checks that need no GPU.

1. The CUDA extension really contains SASS for every arch it was built for, with the epilogue
   kernels (csrc/cuda/epilogue.cu) in each, and the 16-byte vector path really is 128-bit
   loads/stores (cuobjdump from the triton wheel; the system toolkit does not ship it); the
   implicit-GEMM convolution kernels are on tensor cores (HMMA from mma.sync in every arch,
   HGMMA from wgmma in sm_90a), fed by ldmatrix / cp.async, and do not spill.
2. The epilogue's index and value arithmetic (csrc/cuda/epilogue_math.cuh) compiled for the
   host with g++ agrees with Python for NCHW and NHWC decompositions and residual offsets under
   arbitrary strides, including shapes whose linear index exceeds 2^31 and 2^32.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

import resnet_kernels

ROOT = Path(__file__).resolve().parents[1]
MATH_HEADER = ROOT / "csrc" / "cuda" / "epilogue_math.cuh"
DEFAULT_SM = ("sm_80", "sm_90a")  # setup.py's default arch list "8.0;9.0a"


# --- helpers ----------------------------------------------------------------------------------
def _build_info():
    if not resnet_kernels._C_STATUS[0]:
        return None
    return torch.ops.resnet_kernels.build_info()


def _expected_sms(info):
    """sm_XX names for the `archs=` entry of build_info ("8.0;9.0a" -> sm_80, sm_90a)."""
    archs = info.split("archs=", 1)[1] if "archs=" in info else ""  # the last field; holds ';'
    sms = [f"sm_{a}{b}{c}" for a, b, c in re.findall(r"(\d+)\.(\d+)([af]?)", archs)]
    return tuple(dict.fromkeys(sms)) or DEFAULT_SM


def _cuobjdump():
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.origin:
        return None
    tool = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return tool if tool.is_file() and os.access(tool, os.X_OK) else None


def _extension_so():
    return Path(importlib.import_module("resnet_kernels._C").__file__)


def _run(args, **kw):
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kw)
    assert out.returncode == 0, f"{args[0]} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


# --- 1. SASS in the built extension -----------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_so():
    info = _build_info()
    if info is None:
        pytest.skip(f"resnet_kernels._C did not load: {resnet_kernels._C_STATUS[1]}")
    if "cuda=1" not in info:
        pytest.skip(f"the extension was built without CUDA kernels (build_info: {info}); nvcc was not found "
                    "at build time or RESNET_KERNELS_BUILD_CUDA=0")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found: it ships in the triton wheel (triton/backends/nvidia/bin); "
                    "install triton to run the SASS checks")
    return tool, _extension_so(), _expected_sms(info)


def _symbols_by_arch(tool, so):
    """{sm_XX: [function symbols]} from `cuobjdump -symbols`."""
    table, arch = {}, None
    for line in _run([tool, "-symbols", so]).splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            table.setdefault(arch, [])
        elif arch and line.startswith("STT_FUNC"):
            table[arch].append(line.split()[-1])
    return table


def test_elf_per_arch(cuda_so):
    tool, so, sms = cuda_so
    listing = _run([tool, "--list-elf", so])
    found = set(re.findall(r"\.(sm_\d+[af]?)\.cubin", listing))
    for sm in sms:
        assert sm in found, f"no {sm} SASS (ELF) in {so.name}; cuobjdump --list-elf says:\n{listing}"
    epilogue_cubins = set(re.findall(r"epilogue\.(sm_\d+[af]?)\.cubin", listing))
    assert set(sms) <= epilogue_cubins, f"epilogue.cu is not compiled for every arch {sms}:\n{listing}"


# Mangled template arguments of the 16-byte vector instantiations: <float, 4>, <Half, 8>, <BFloat16, 8>.
_VECTOR_INSTANCES = {"float": "IfLi4E", "half": "IN3c104HalfELi8E", "bfloat16": "IN3c108BFloat16ELi8E"}


def test_epilogue_kernels_per_arch(cuda_so):
    tool, so, sms = cuda_so
    table = _symbols_by_arch(tool, so)
    for sm in sms:
        funcs = table.get(sm, [])
        for layout in ("nhwc", "nchw"):
            name = f"bn_act_epilogue_{layout}_kernel"
            ours = [f for f in funcs if name in f]
            assert ours, f"{name} is missing from the {sm} SASS of {so.name}"
            for dtype, tag in _VECTOR_INSTANCES.items():
                assert any(tag in f for f in ours), f"no {dtype} 16-byte-vector {name} for {sm}: {ours}"


def test_vector_path_uses_128_bit_accesses(cuda_so):
    tool, so, sms = cuda_so
    table = _symbols_by_arch(tool, so)
    for sm in sms:
        # channels_last, half, 8 per vector, no residual (Res 0)
        [fn] = [f for f in table[sm] if "bn_act_epilogue_nhwc_kernel" in f and "IN3c104HalfELi8ELNS0_3ResE0E" in f]
        sass = _run([tool, "-sass", "-arch", sm, "-fun", fn, so])
        assert "LDG.E.128" in sass and "STG.E.128" in sass, f"{sm}: the vector path lost its 128-bit accesses:\n{sass}"
        assert not re.search(r"\b(STL|LDL)\b", sass), f"{sm}: {fn} spills to local memory"


# --- 1b. the implicit-GEMM convolution kernels (csrc/cuda/conv_bn_act*.cu) -----------------------
# Mangled pieces of the instantiations: element type, and the trailing bool template flags:
# sm80 <T, Cfg, kVec, kStats>, sm90 <T, Cfg, kStats>. kVec: Lb1E = the 16-byte cp.async path,
# Lb0E = predicated scalar loads for C % 8 != 0 (the 7x7 stem). kStats: Lb1E = the training
# variant (raw y + per-tile channel statistics epilogue), Lb0E = the fused BN/residual/ReLU one.
_ELEM = {"half": "I6__half", "bfloat16": "I13__nv_bfloat16"}
_HMMA = {"half": re.compile(r"HMMA\.16816\.F32(?!\.BF16)\b"), "bfloat16": re.compile(r"HMMA\.16816\.F32\.BF16\b")}
_HGMMA = {"half": re.compile(r"HGMMA\.64x(64|128)x16\.F32(?!\.BF16)\b"),
          "bfloat16": re.compile(r"HGMMA\.64x(64|128)x16\.F32\.BF16\b")}


def _sass(tool, so, sm, fn):
    return _run([tool, "-sass", "-arch", sm, "-fun", fn, so])


def _res_usage(tool, so, sm):
    """{function: {"REG": n, "STACK": n, "LOCAL": n, ...}} from `cuobjdump -res-usage`."""
    out, fn, table = _run([tool, "-res-usage", "-arch", sm, so]), None, {}
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
        elif fn and "REG:" in line:
            table[fn] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            fn = None
    return table


def _conv_kernels(table, sm, family):
    return [f for f in table.get(sm, []) if f"conv_bn_act_{family}_kernel" in f]


def _flags(fn):
    """The trailing bool template arguments of a conv kernel's mangled name, e.g. (True, False)."""
    m = re.search(r"((?:Lb[01]E)+)EEvNS0_6Params", fn)
    assert m, f"cannot read the template flags of {fn}"
    return tuple(b == "1" for b in re.findall(r"Lb([01])E", m.group(1)))


@pytest.mark.parametrize("dtype", ["half", "bfloat16"])
def test_mma_sync_kernels_use_tensor_cores(cuda_so, dtype):
    """Every sm_80+ arch carries the mma.sync kernel: HMMA.16816 with fp32 accumulate, fed by
    ldmatrix (LDSM); the vector instantiations load by cp.async (LDGSTS, 16 bytes, zero fill)."""
    tool, so, sms = cuda_so
    table = _symbols_by_arch(tool, so)
    for sm in sms:
        funcs = [f for f in _conv_kernels(table, sm, "sm80") if _ELEM[dtype] in f]
        # 128x128 vector, 64x64 vector, 64x64 scalar; each as inference and training (stats) kernel
        assert sorted(_flags(f) for f in funcs) == sorted(
            [(True, False), (True, False), (False, False), (True, True), (True, True), (False, True)]), \
            f"{sm}: expected the 128x128, 64x64 and scalar {dtype} mma.sync kernels, inference and stats, got {funcs}"
        for fn in funcs:
            sass = _sass(tool, so, sm, fn)
            assert _HMMA[dtype].search(sass), f"{sm} {fn}: no {dtype} HMMA.16816.F32 (mma.sync) in its SASS"
            assert "LDSM.16.M88.4" in sass, f"{sm} {fn}: operands are not loaded with ldmatrix.x4 (LDSM)"
            other = "bfloat16" if dtype == "half" else "half"
            assert not _HMMA[other].search(sass), f"{sm} {fn}: {other} HMMA in a {dtype} kernel"
            if _flags(fn)[0]:
                assert "LDGSTS.E.BYPASS.128.ZFILL" in sass, f"{sm} {fn}: the vector path lost its 16-byte cp.async"


@pytest.mark.parametrize("dtype", ["half", "bfloat16"])
def test_wgmma_kernels_use_hopper_tensor_cores(cuda_so, dtype):
    """The sm_90a build carries warpgroup wgmma (HGMMA 64xNx16, fp32 accumulate) for both tile
    widths, with operands staged by cp.async."""
    tool, so, sms = cuda_so
    if "sm_90a" not in sms:
        pytest.skip(f"the extension was built without sm_90a (archs: {sms})")
    table = _symbols_by_arch(tool, so)
    funcs = [f for f in _conv_kernels(table, "sm_90a", "sm90") if _ELEM[dtype] in f]
    assert sorted(_flags(f) for f in funcs) == [(False,), (False,), (True,), (True,)], \
        f"expected the 128x128 and 128x64 {dtype} wgmma kernels (inference and stats) in sm_90a, got {funcs}"
    widths = set()
    for fn in funcs:
        sass = _sass(tool, so, "sm_90a", fn)
        m = _HGMMA[dtype].search(sass)
        assert m, f"sm_90a {fn}: no {dtype} HGMMA (wgmma) in its SASS"
        widths.add(m.group(1))
        assert "WARPGROUP.ARRIVE" in sass, f"sm_90a {fn}: no wgmma.fence (WARPGROUP.ARRIVE)"
        assert "LDGSTS.E.BYPASS.128.ZFILL" in sass, f"sm_90a {fn}: operands are not staged by 16-byte cp.async"
    assert widths == {"64", "128"}, f"wgmma tile widths {widths}"


def test_stats_kernels_reduce_in_shared_memory(cuda_so):
    """The training (kStats) conv kernels carry the statistics epilogue: besides the tensor-core
    main loop, their SASS stores the per-tile partial sums to global memory with plain 32-bit
    stores and reads the fp32 tile back from shared memory as 128-bit vectors (LDS.128); the
    inference kernels of the same config have no extra global float stores beyond y."""
    tool, so, sms = cuda_so
    table = _symbols_by_arch(tool, so)
    for sm in sms:
        for family in ("sm80", "sm90") if sm == "sm_90a" else ("sm80",):
            stats = [f for f in _conv_kernels(table, sm, family) if _flags(f)[-1]]
            assert stats, f"{sm}: no {family} statistics (training) kernels"
            for fn in stats:
                sass = _sass(tool, so, sm, fn)
                assert "LDS.128" in sass, f"{sm} {fn}: the statistics pass does not read the tile as float4"
                assert re.search(r"\bSTG\.E\s", sass), f"{sm} {fn}: no 32-bit global stores of psum/pm2/pcnt"
                assert "HMMA" in sass or "HGMMA" in sass, f"{sm} {fn}: not on tensor cores"


def test_main_conv_kernels_do_not_spill(cuda_so):
    """ptxas' verdict, read back from the binary: the vector mma.sync kernels and the wgmma
    kernels use no stack and no local memory (no spills), and their SASS has no STL/LDL. (The
    scalar-load kernel for C % 8 != 0, i.e. the C=3 stem, is allowed a few bytes of stack.)"""
    tool, so, sms = cuda_so
    for sm in sms:
        usage = _res_usage(tool, so, sm)
        main = [f for f in usage if "conv_bn_act_sm80_kernel" in f and _flags(f)[0]]
        if sm == "sm_90a":
            main += [f for f in usage if "conv_bn_act_sm90_kernel" in f]
        assert main, f"{sm}: no conv kernels in -res-usage"
        for fn in main:
            u = usage[fn]
            assert u.get("STACK", 0) == 0 and u.get("LOCAL", 0) == 0, f"{sm} {fn} spills: {u}"
            assert u["REG"] <= 255, f"{sm} {fn}: {u}"
            assert not re.search(r"\b(STL|LDL)\b", _sass(tool, so, sm, fn)), f"{sm} {fn}: local memory in SASS"


# --- 2. host-side check of epilogue_math.cuh ---------------------------------------------------
_DRIVER = r"""
#include <cstdio>
#include <cstring>
#include <cstdint>
#include "cuda/epilogue_math.cuh"

using namespace resnet_kernels::epilogue;

// One query per input line; one answer per output line.
int main() {
  char op[16];
  while (std::scanf("%15s", op) == 1) {
    if (!std::strcmp(op, "coord")) {  // layout N K P Q sN sK sP sQ i
      char layout[8];
      long long N, K, P, Q, sn, sk, sp, sq, i;
      std::scanf("%7s %lld %lld %lld %lld %lld %lld %lld %lld %lld", layout, &N, &K, &P, &Q, &sn, &sk, &sp, &sq, &i);
      (void)N;
      const bool nhwc = !std::strcmp(layout, "nhwc");
      const Coord c = nhwc ? nhwc_coord(i, K, P, Q) : nchw_coord(i, K, P, Q);
      const Strides s{sn, sk, sp, sq};
      const int64_t off = nhwc ? residual_offset_nhwc(i, K, P, Q, s) : residual_offset_nchw(i, K, P, Q, s);
      std::printf("%lld %lld %lld %lld %lld\n", (long long)c.n, (long long)c.k, (long long)c.p, (long long)c.q,
                  (long long)off);
    } else if (!std::strcmp(op, "divmod")) {
      long long a, b;
      std::scanf("%lld %lld", &a, &b);
      int64_t q, r;
      divmod(a, b, q, r);
      std::printf("%lld %lld\n", (long long)q, (long long)r);
    } else if (!std::strcmp(op, "vec")) {  // inner elem_bytes addr
      long long inner;
      int eb;
      unsigned long long addr;
      std::scanf("%lld %d %llu", &inner, &eb, &addr);
      std::printf("%d\n", vector_width(inner, eb, addr));
    } else if (!std::strcmp(op, "bnact")) {  // bit patterns of v scale shift res, relu
      uint32_t b[4];
      int relu;
      std::scanf("%u %u %u %u %d", &b[0], &b[1], &b[2], &b[3], &relu);
      float f[4];
      std::memcpy(f, b, sizeof f);
      const float out = bn_act(f[0], f[1], f[2], f[3], relu != 0);
      uint32_t ob;
      std::memcpy(&ob, &out, sizeof ob);
      std::printf("%u\n", ob);
    } else {
      return 2;
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def math_driver(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/c++) on PATH")
    d = tmp_path_factory.mktemp("epilogue_math")
    (d / "driver.cpp").write_text(_DRIVER)
    exe = d / "driver"
    # C++17: the oldest standard the project builds with (torch 2.11); warnings are errors so the
    # header stays clean outside nvcc.
    _run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}", d / "driver.cpp", "-o", exe])

    def ask(lines):
        out = _run([exe], input="\n".join(lines) + "\n").splitlines()
        assert len(out) == len(lines)
        return out

    return ask


def _coord_ref(layout, shape, i):
    n_, k_, p_, q_ = shape
    if layout == "nhwc":
        t, k = divmod(i, k_)
        t, q = divmod(t, q_)
        n, p = divmod(t, p_)
    else:
        t, q = divmod(i, q_)
        t, p = divmod(t, p_)
        n, k = divmod(t, k_)
    assert 0 <= n < n_
    return n, k, p, q


def _strides_cases(shape):
    """Residual strides of views a real residual can be: dense either way, a transposed base,
    a strided slice of a bigger tensor, a broadcast (stride 0)."""
    n, k, p, q = shape
    return {
        "nchw": (k * p * q, p * q, q, 1),
        "nhwc": (p * q * k, 1, q * k, k),
        "transposed": (p * k * q, q, k * q, 1),  # base [N, P, K, Q] permuted to [N, K, P, Q]
        "sliced": (2 * k * (p + 3) * 2 * q, 2 * (p + 3) * 2 * q, 2 * q, 2),  # base[:, ::2, 1:P+1, 1::2]
        "broadcast": (0, 1, 0, 0),  # a [1, K, 1, 1] bias expanded
    }


def _indices(total, rng, count=40):
    edges = [0, 1, total - 1, total // 2]
    for b in (2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**32 + 1, 2**33 + 7):
        if b < total:
            edges.append(b)
    return sorted(set(edges + [rng.randrange(total) for _ in range(count)]))


LARGE_SHAPES = [
    (64, 2048, 200, 200),  # 5.2e9 elements: the linear index passes 2^31 and 2^32
    (3, 1_000_003, 7, 101),  # prime-ish sizes
    (2, 2**31 + 11, 1, 1),  # K itself past 32 bits: the 64-bit divide branch
    (1, 3, 65_537, 65_539),  # P * Q past 2^32 in the NCHW plane split
    (256, 64, 112, 112),  # ResNet stem output, batch 256 (2.06e8)
    (8, 7, 7, 7),
]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_coords_and_residual_offsets_large(math_driver, layout):
    rng = random.Random(0)
    lines, want = [], []
    for shape in LARGE_SHAPES:
        total = math.prod(shape)
        for sname, st in _strides_cases(shape).items():
            for i in _indices(total, rng):
                n, k, p, q = _coord_ref(layout, shape, i)
                lines.append(f"coord {layout} {' '.join(map(str, shape))} {' '.join(map(str, st))} {i}")
                want.append((shape, sname, i, (n, k, p, q, n * st[0] + k * st[1] + p * st[2] + q * st[3])))
    got = math_driver(lines)
    for (shape, sname, i, ref), line in zip(want, got):
        assert tuple(int(v) for v in line.split()) == ref, f"{layout} shape={shape} strides={sname} i={i}"


def _views(shape):
    """(name, residual view) pairs over real torch storage whose values are storage indices."""
    n, k, p, q = shape

    def base(*s):
        return torch.arange(math.prod(s), dtype=torch.float64).view(*s)

    return [
        ("nchw", base(n, k, p, q)),
        ("channels_last", base(n, p, q, k).permute(0, 3, 1, 2)),
        ("transposed", base(n, p, k, q).transpose(1, 2)),
        ("sliced", base(n + 1, 2 * k, p + 3, 2 * q + 1)[1:, ::2, 1:p + 1, 1::2]),
        ("spatial_transposed", base(n, k, q, p).transpose(2, 3)),
        ("broadcast", base(1, k, 1, 1).expand(n, k, p, q)),
    ]


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 8, 7, 7), (3, 16, 1, 6), (2, 5, 3, 1)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_residual_offsets_match_torch_views(math_driver, shape, layout):
    """Every element: the header's offset (plus the view's storage offset) is where torch keeps it."""
    total = math.prod(shape)
    lines, want = [], []
    for name, r in _views(shape):
        assert tuple(r.shape) == shape
        st = r.stride()
        for i in range(total):
            n, k, p, q = _coord_ref(layout, shape, i)
            lines.append(f"coord {layout} {' '.join(map(str, shape))} {' '.join(map(str, st))} {i}")
            want.append((name, i, (n, k, p, q), int(r[n, k, p, q].item()) - r.storage_offset()))
    got = math_driver(lines)
    for (name, i, coord, off), line in zip(want, got):
        vals = tuple(int(v) for v in line.split())
        assert vals[:4] == coord, f"{layout} {shape} i={i}: coord {vals[:4]} != {coord}"
        assert vals[4] == off, f"{layout} {shape} view={name} i={i} {coord}: offset {vals[4]} != {off}"


def test_nhwc_vector_elements_are_consecutive_channels(math_driver):
    """The vector path reads a strided residual at base + j * stride_k for the VEC elements of one
    vector: valid because VEC divides K, so a vector never crosses a pixel."""
    shape, vec = (2, 24, 3, 5), 8
    st = _strides_cases(shape)["sliced"]
    total = math.prod(shape)
    lines = [f"coord nhwc {' '.join(map(str, shape))} {' '.join(map(str, st))} {i}" for i in range(total)]
    offs = [int(line.split()[4]) for line in math_driver(lines)]
    for i0 in range(0, total, vec):
        assert offs[i0:i0 + vec] == [offs[i0] + j * st[1] for j in range(vec)], f"vector at {i0}"


def test_divmod_32_and_64_bit_branches(math_driver):
    rng = random.Random(1)
    pairs = [(0, 1), (7, 7), (2**32 - 1, 1), (2**32 - 1, 2**32 - 1), (2**32, 3), (2**32 - 1, 2**32),
             (2**63 - 1, 2**31 + 11), (5 * 2**40 + 3, 2**33), (123456789, 1)]
    pairs += [(rng.randrange(2**62), rng.randrange(1, 2**20)) for _ in range(50)]
    pairs += [(rng.randrange(2**32), rng.randrange(1, 2**32)) for _ in range(50)]
    got = math_driver([f"divmod {a} {b}" for a, b in pairs])
    for (a, b), line in zip(pairs, got):
        assert tuple(int(v) for v in line.split()) == divmod(a, b), f"divmod({a}, {b})"


def test_vector_width_rule(math_driver):
    cases = [  # inner, element bytes, OR of addresses -> elements per access
        (64, 2, 0x7F0000000000, 8), (64, 4, 0x7F0000000000, 4), (64, 2, 0x7F0000000008, 1),
        (12, 2, 0, 1), (12, 4, 0, 4), (3, 2, 0, 1), (49, 2, 0, 1), (3136, 2, 0x10, 8), (196, 4, 0x20, 4),
        (196, 2, 0x20, 1), (8, 2, 0x2, 1),
    ]
    got = math_driver([f"vec {i} {e} {a}" for i, e, a, _ in cases])
    for (inner, eb, addr, want), line in zip(cases, got):
        assert int(line) == want, f"vector_width(inner={inner}, bytes={eb}, addr={addr:#x})"


def _f2b(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _b2f(b):
    return struct.unpack("<f", struct.pack("<I", b))[0]


def test_bn_act_values(math_driver):
    inf, nan = float("inf"), float("nan")
    cases = [  # v, scale, shift, residual, relu; dyadic values are exact in fp32
        (3.0, 0.5, -2.0, 1.0, True), (3.0, 0.5, -2.0, -1.0, True), (3.0, 0.5, -2.0, -1.0, False),
        (-1.0, 2.0, 0.25, 0.0, True), (1e4, 1e-4, 0.0, 0.0, False), (65504.0, 1e3, 0.0, 0.0, False),
        (nan, 1.0, 0.0, 0.0, True), (1.0, 1.0, 0.0, nan, True), (-inf, 1.0, 0.0, 0.0, True),
        (inf, 1.0, 0.0, 0.0, True), (0.1, 3.0, 0.7, -0.2, False), (-7.5, -0.125, 1.0, 2.0, True),
    ]
    lines = [f"bnact {_f2b(v)} {_f2b(s)} {_f2b(t)} {_f2b(r)} {int(relu)}" for v, s, t, r, relu in cases]
    got = [_b2f(int(line)) for line in math_driver(lines)]
    f32 = lambda x: _b2f(_f2b(x))  # noqa: E731
    for (v, s, t, r, relu), out in zip(cases, got):
        v, s, t, r = f32(v), f32(s), f32(t), f32(r)
        ref = v * s + t + r  # float64; the header rounds once (fma) then once (add) in fp32
        if relu and ref < 0:
            ref = 0.0
        if math.isnan(ref):
            assert math.isnan(out), f"NaN must propagate through ReLU: {(v, s, t, r, relu)} -> {out}"
        elif math.isinf(ref):
            assert out == ref
        else:
            assert math.isclose(out, ref, rel_tol=3e-7, abs_tol=1e-30), f"{(v, s, t, r, relu)}: {out} != {ref}"
            if relu:
                assert out >= 0.0
