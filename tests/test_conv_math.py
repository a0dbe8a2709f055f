"""Host-side checks of the implicit-GEMM index arithmetic (csrc/cuda/conv_math.cuh).

The header is plain C++, so it is compiled with g++ into a small driver that answers batches of
queries on stdin/stdout (one process per test, thousands of queries each), and every answer is
compared with a reference written independently here:

1. im2col / weight addressing of the NHWC implicit GEMM (rows m = (n, p, q), reduction
   kk = (r, s, c), c innermost) over the full cross product of filters, strides, paddings,
   dilations, channel counts, image sizes and batches, with tails past the end of the GEMM; the
   Python reference is itself checked against torch (unfold and conv2d on tensors whose values
   are their storage indices); offsets past 2^31 and 2^32; the output-size formula.
2. The 128-byte shared-memory swizzle: a bijection, conflict-free for ldmatrix and cp.async,
   and exactly CUTLASS's Swizzle<3,4,3> (the pattern Hopper's 128B-swizzle descriptors expect).
3. The thread -> fragment maps as the sm_80 kernel uses them (ldmatrix.x4 feeding
   mma.sync.m16n8k16, the accumulator write-back) and as the sm_90a kernel indexes wgmma's
   m64nNk16 accumulator, simulated from the PTX ISA's own definitions.
4. The wgmma shared-memory matrix descriptor bit fields.
5. The epilogue's residual offsets against real torch views.

References (PTX ISA 8.x/9.x, docs.nvidia.com/cuda/parallel-thread-execution):
  * ldmatrix: "addresses addr0-addr7 correspond to the rows of the first matrix, addresses
    addr8-addr15 correspond to the rows of the second matrix" (x4: threads 0-7, 8-15, 16-23,
    24-31); "Each thread in a warp loads fragments of a row, with thread 0 receiving the first
    fragment in its register r ... A group of four threads loads an entire row"; "when .num =
    .x4, elements of the third and fourth matrices are loaded in the subsequent destination
    registers".
  * mma.m16n8k16 (.f16/.bf16), groupID = %laneid >> 2, threadID_in_group = %laneid % 4:
      A: row = groupID for ai, 0 <= i < 2 || 4 <= i < 6, groupID + 8 otherwise;
         col = threadID_in_group * 2 + (i & 1) (+ 8 for i >= 4)
      B: row = threadID_in_group * 2 + (i & 1) (+ 8 for i >= 2); col = groupID
      C/D: row = groupID for ci, i < 2, groupID + 8 for i >= 2; col = threadID_in_group*2 + (i & 1)
  * wgmma .m64nNk16 accumulator D: given in the ISA as a figure (Figure 149); its textual form is
    CUTLASS's GMMA::CLayout_64xN = ((4,8,4),(2,2,N/8)) : ((128,1,16),(64,8,512)), a (thread,
    value) -> column-major 64 x N offset map, decoded below.
  * wgmma matrix descriptor: bits 13-0 encode(start address), 29-16 encode(leading dimension
    byte offset), 45-32 encode(stride dimension byte offset), 51-49 matrix base offset, 63-62
    swizzle mode (0 none, 1 128-Byte, 2 64-Byte, 3 32-Byte), encode(x) = (x & 0x3FFFF) >> 4;
    the base offset is 0 when the 128-Byte pattern starts on a 1024-Byte boundary.
"""
from __future__ import annotations

import itertools
import math
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SM80_SRC = CSRC / "cuda" / "conv_sm80.cuh"
SM90_SRC = CSRC / "cuda" / "conv_sm90.cuh"

# --- the driver -------------------------------------------------------------------------------
_DRIVER = r"""
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "cuda/conv_math.cuh"

using namespace resnet_kernels::conv;

// One query per input line, one answer per output line. "g" sets the geometry that the
// following a/b/r lines use.
int main() {
  char op[4];
  Geom g{};
  while (std::scanf("%3s", op) == 1) {
    if (!std::strcmp(op, "g")) {  // N H W C K R S P Q sh sw ph pw dh dw -> M Kg
      long long v[15];
      for (long long& x : v)
        if (std::scanf("%lld", &x) != 1) return 3;
      g.N = v[0]; g.H = v[1]; g.W = v[2]; g.C = v[3]; g.K = v[4]; g.R = v[5]; g.S = v[6];
      g.P = v[7]; g.Q = v[8]; g.sh = v[9]; g.sw = v[10]; g.ph = v[11]; g.pw = v[12];
      g.dh = v[13]; g.dw = v[14];
      std::printf("%lld %lld\n", (long long)gemm_m(g), (long long)gemm_k(g));
    } else if (!std::strcmp(op, "a")) {  // m kk -> Row, Tap, a_offset, im2col_offset
      long long m, kk;
      if (std::scanf("%lld %lld", &m, &kk) != 2) return 3;
      const Row row = row_info(g, m);
      const Tap t = tap_info(g, kk);
      std::printf("%lld %d %d %d %d %d %d %d %lld %lld\n", (long long)row.base, (int)row.h0, (int)row.w0,
                  (int)row.valid, (int)t.r, (int)t.s, (int)t.c, (int)t.valid, (long long)a_offset(g, row, t),
                  (long long)im2col_offset(g, m, kk));
    } else if (!std::strcmp(op, "b")) {  // j kk -> b_offset
      long long j, kk;
      if (std::scanf("%lld %lld", &j, &kk) != 2) return 3;
      std::printf("%lld\n", (long long)b_offset(g, j, kk));
    } else if (!std::strcmp(op, "r")) {  // m j sn sk sp sq -> residual_offset
      long long m, j, sn, sk, sp, sq;
      if (std::scanf("%lld %lld %lld %lld %lld %lld", &m, &j, &sn, &sk, &sp, &sq) != 6) return 3;
      const resnet_kernels::epilogue::Strides s{sn, sk, sp, sq};
      std::printf("%lld\n", (long long)residual_offset(g, m, j, s));
    } else if (!std::strcmp(op, "o")) {  // in k stride pad dil -> out_size
      long long in, k, s, p, d;
      if (std::scanf("%lld %lld %lld %lld %lld", &in, &k, &s, &p, &d) != 5) return 3;
      std::printf("%lld\n", (long long)out_size(in, k, s, p, d));
    } else if (!std::strcmp(op, "sw")) {  // row chunk -> swizzle_offset
      unsigned r, c;
      if (std::scanf("%u %u", &r, &c) != 2) return 3;
      std::printf("%u\n", swizzle_offset(r, c));
    } else if (!std::strcmp(op, "se")) {  // row col -> swizzle_elem
      unsigned r, c;
      if (std::scanf("%u %u", &r, &c) != 2) return 3;
      std::printf("%u\n", swizzle_elem(r, c));
    } else if (!std::strcmp(op, "f")) {  // lane -> ldsm a row/col, b row/col, acc (row, col) x 4
      unsigned l;
      if (std::scanf("%u", &l) != 1) return 3;
      std::printf("%u %u %u %u", ldsm_a_row(l), ldsm_a_col(l), ldsm_b_row(l), ldsm_b_col(l));
      for (unsigned i = 0; i < 4; ++i) std::printf(" %u %u", acc_row(l, i), acc_col(l, i));
      std::printf("\n");
    } else if (!std::strcmp(op, "d")) {  // shared address -> wgmma_desc
      unsigned a;
      if (std::scanf("%u", &a) != 1) return 3;
      std::printf("%llu\n", (unsigned long long)wgmma_desc(a));
    } else if (!std::strcmp(op, "k")) {  // the tile constants
      std::printf("%d %d %d\n", kTileK, kRowBytes, kChunksPerRow);
    } else {
      return 2;
    }
  }
  return 0;
}
"""


def _run(args, **kw):
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kw)
    assert out.returncode == 0, f"{args[0]} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def conv_math(tmp_path_factory):
    """ask(lines) -> answer lines, from the header compiled as it is (C++17, warnings are errors)."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/c++) on PATH: cannot compile csrc/cuda/conv_math.cuh for the host")
    d = tmp_path_factory.mktemp("conv_math")
    (d / "driver.cpp").write_text(_DRIVER)
    exe = d / "driver"
    _run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}", d / "driver.cpp", "-o", exe])

    def ask(lines):
        out = _run([exe], input="\n".join(lines) + "\n").splitlines()
        assert len(out) == len(lines), f"driver answered {len(out)} of {len(lines)} queries"
        return out

    return ask


def _ints(line):
    return tuple(int(v) for v in line.split())


# --- Python reference of the GEMM view ----------------------------------------------------------
def out_size_ref(n, k, s, p, d):
    """torch's output-size rule: floor((n + 2p - d(k-1) - 1) / s) + 1; < 1 means torch rejects."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


class G:
    """An NHWC conv geometry with the output size of torch's rule."""

    def __init__(self, N, H, W, C, K, R, S, stride=(1, 1), pad=(0, 0), dil=(1, 1)):
        self.N, self.H, self.W, self.C, self.K, self.R, self.S = N, H, W, C, K, R, S
        (self.sh, self.sw), (self.ph, self.pw), (self.dh, self.dw) = stride, pad, dil
        self.P = out_size_ref(H, R, self.sh, self.ph, self.dh)
        self.Q = out_size_ref(W, S, self.sw, self.pw, self.dw)
        self.M = N * self.P * self.Q
        self.Kg = R * S * C

    @property
    def valid(self):
        return self.P >= 1 and self.Q >= 1

    def line(self):
        return (f"g {self.N} {self.H} {self.W} {self.C} {self.K} {self.R} {self.S} {self.P} {self.Q} "
                f"{self.sh} {self.sw} {self.ph} {self.pw} {self.dh} {self.dw}")

    def __repr__(self):
        return (f"G(N={self.N}, H={self.H}, W={self.W}, C={self.C}, K={self.K}, R={self.R}, S={self.S}, "
                f"stride=({self.sh},{self.sw}), pad=({self.ph},{self.pw}), dil=({self.dh},{self.dw}))")

    def row(self, m):
        n, pq = divmod(m, self.P * self.Q)
        p, q = divmod(pq, self.Q)
        return n, p, q

    def tap(self, kk):
        rs, c = divmod(kk, self.C)
        r, s = divmod(rs, self.S)
        return r, s, c

    def a_ref(self, m, kk):
        """Offset of A[m, kk] = x[n, p*sh - ph + r*dh, q*sw - pw + s*dw, c] in NHWC x, -1 for the
        zero padding and for m >= M or kk >= Kg."""
        if not (0 <= m < self.M and 0 <= kk < self.Kg):
            return -1
        n, p, q = self.row(m)
        r, s, c = self.tap(kk)
        h = p * self.sh - self.ph + r * self.dh
        w = q * self.sw - self.pw + s * self.dw
        if not (0 <= h < self.H and 0 <= w < self.W):
            return -1
        return ((n * self.H + h) * self.W + w) * self.C + c

    def b_ref(self, j, kk):
        """Offset of B[kk, j] = w[j, r, s, c] in the KRSC weight, -1 outside the GEMM."""
        return j * self.Kg + kk if (0 <= j < self.K and 0 <= kk < self.Kg) else -1


def _a_queries(g, ms, kks):
    return [f"a {m} {kk}" for m, kk in zip(ms, kks)]


def _check_a(g, pairs, answers):
    """Row / Tap fields where defined, validity flags and both offset entry points everywhere."""
    hwc, pq = g.H * g.W * g.C, g.P * g.Q
    for (m, kk), line in zip(pairs, answers):
        want = g.a_ref(m, kk)
        if m < g.M and kk < g.Kg:  # fast path: the whole answer is determined
            n, rem = divmod(m, pq)
            p, q = divmod(rem, g.Q)
            r, s, c = g.tap(kk)
            if line == f"{n * hwc} {p * g.sh - g.ph} {q * g.sw - g.pw} 1 {r} {s} {c} 1 {want} {want}":
                continue
        base, h0, w0, rvalid, r, s, c, tvalid, aoff, im2col = _ints(line)
        ctx = f"{g} m={m} kk={kk}"
        assert (rvalid, tvalid) == (int(m < g.M), int(kk < g.Kg)), f"{ctx}: valid flags {(rvalid, tvalid)}"
        if m < g.M:
            n, p, q = g.row(m)
            assert (base, h0, w0) == (n * hwc, p * g.sh - g.ph, q * g.sw - g.pw), \
                f"{ctx}: row_info (base, h0, w0) = {(base, h0, w0)}, want {(n * hwc, p * g.sh - g.ph, q * g.sw - g.pw)}"
        if kk < g.Kg:
            assert (r, s, c) == g.tap(kk), f"{ctx}: tap_info (r, s, c) = {(r, s, c)}, want {g.tap(kk)}"
        assert aoff == want, f"{ctx}: a_offset = {aoff}, want {want}"
        assert im2col == want, f"{ctx}: im2col_offset = {im2col}, want {want}"


# --- 1. im2col addressing ---------------------------------------------------------------------
FILTERS = [(1, 1), (3, 3), (5, 5), (7, 7), (1, 3), (3, 1)]
STRIDES = [(1, 1), (2, 2), (3, 3), (1, 2), (3, 1)]
PADS = [(0, 0), (1, 1), (2, 2), (3, 3), (0, 2), (3, 1)]
DILS = [(1, 1), (2, 2), (3, 3), (2, 1)]
CHANNELS = [3, 8, 20, 64]
SPATIAL = [(1, 1), (7, 7), (15, 15), (33, 17)]
BATCHES = [1, 3]


def _sweep_geometries():
    gs = []
    for i, ((r, s), st, pad, dil, c, (h, w), n) in enumerate(
            itertools.product(FILTERS, STRIDES, PADS, DILS, CHANNELS, SPATIAL, BATCHES)):
        g = G(n, h, w, c, (1, 8, 24, 64)[i % 4], r, s, st, pad, dil)
        if g.valid:
            gs.append(g)
    return gs


def test_im2col_sweep(conv_math):
    """Every combination of filter (incl. non-square), stride (incl. h != w), padding (incl.
    asymmetric), dilation, channel count, odd image size and batch: row_info, tap_info, a_offset,
    im2col_offset, gemm_m, gemm_k and b_offset agree with the reference. The rows and taps asked
    for are the ends of each image and of the GEMM, the tails past M and Kg (which must read as
    -1: the loader zero-fills them), the first and last channel of a tap, and random ones."""
    rng = random.Random(0)
    gs = _sweep_geometries()
    assert len(gs) > 5000
    lines, plan = [], []
    for g in gs:
        pq = g.P * g.Q
        m_edges = [0, pq - 1, g.M - 1, g.M, g.M + 1, g.M + 1000] + ([pq] if g.N > 1 else [])
        k_edges = [0, g.C - 1, g.Kg - 1, g.Kg, g.Kg + 7, (g.R * g.S - 1) * g.C] + ([g.C] if g.Kg > g.C else [])
        pairs = [(m, rng.randrange(g.Kg)) for m in m_edges] + [(rng.randrange(g.M), kk) for kk in k_edges]
        pairs += [(rng.randrange(g.M), rng.randrange(g.Kg)) for _ in range(6)]
        bpairs = [(g.K - 1, g.Kg - 1), (g.K, rng.randrange(g.Kg)), (rng.randrange(g.K), g.Kg),
                  (rng.randrange(g.K), rng.randrange(g.Kg))]
        lines.append(g.line())
        lines += [f"a {m} {kk}" for m, kk in pairs]
        lines += [f"b {j} {kk}" for j, kk in bpairs]
        plan.append((g, pairs, bpairs))
    out = conv_math(lines)
    i = 0
    for g, pairs, bpairs in plan:
        assert _ints(out[i]) == (g.M, g.Kg), f"{g}: gemm_m, gemm_k = {out[i]}, want {g.M} {g.Kg}"
        i += 1
        _check_a(g, pairs, out[i:i + len(pairs)])
        i += len(pairs)
        for (j, kk), line in zip(bpairs, out[i:i + len(bpairs)]):
            assert int(line) == g.b_ref(j, kk), f"{g}: b_offset(j={j}, kk={kk}) = {line}, want {g.b_ref(j, kk)}"
        i += len(bpairs)
    assert i == len(out)


def test_im2col_exhaustive_small(conv_math):
    """Every (m, kk) of the GEMM plus a tail row and a tail tap, for small geometries that touch
    all padding sides at once: no sampled sweep can miss an off-by-one at one corner."""
    gs = [G(n, h, w, c, 4, r, s, st, pad, dil)
          for (r, s), st, pad, dil, (h, w), (n, c) in itertools.product(
              [(3, 3), (1, 3), (5, 5)], [(1, 1), (2, 3)], [(1, 1), (3, 0)], [(1, 1), (2, 3)], [(7, 7), (1, 1)],
              [(1, 3), (3, 8)])]
    gs = [g for g in gs if g.valid]
    lines, plan = [], []
    for g in gs:
        pairs = list(itertools.product(range(g.M + 1), range(g.Kg + 1)))
        lines.append(g.line())
        lines += [f"a {m} {kk}" for m, kk in pairs]
        plan.append((g, pairs))
    out = conv_math(lines)
    i = 0
    for g, pairs in plan:
        i += 1
        _check_a(g, pairs, out[i:i + len(pairs)])
        i += len(pairs)


# Small geometries for the torch cross-checks: strided, padded (symmetric and not), dilated,
# non-square, 1x1 images, the 7x7/2 stem and the 1x1/2 projection shortcut.
TORCH_GEOMS = [
    G(1, 7, 7, 3, 5, 3, 3, (1, 1), (1, 1), (1, 1)),
    G(3, 15, 15, 8, 4, 5, 5, (2, 2), (2, 2), (1, 1)),
    G(1, 33, 17, 20, 3, 7, 7, (2, 3), (3, 1), (1, 1)),
    G(3, 7, 7, 8, 2, 3, 3, (3, 1), (0, 2), (2, 3)),
    G(1, 15, 15, 64, 2, 1, 3, (1, 2), (0, 1), (1, 2)),
    G(3, 1, 1, 3, 2, 3, 3, (1, 1), (1, 1), (1, 1)),
    G(1, 7, 7, 20, 3, 1, 1, (2, 2), (0, 0), (1, 1)),
    G(3, 33, 17, 3, 2, 7, 7, (2, 2), (3, 3), (1, 1)),
    G(1, 15, 15, 8, 3, 3, 1, (3, 2), (3, 2), (3, 1)),
]


@pytest.mark.parametrize("g", TORCH_GEOMS, ids=repr)
def test_reference_and_header_match_torch_unfold(conv_math, g):
    """The reference is not the header re-typed: x is an NHWC tensor whose values are its storage
    index + 1, viewed as NCHW; torch.nn.functional.unfold (im2col) gathers it, so unfold - 1 is
    exactly the NHWC offset each A[m, kk] comes from (-1 in the zero padding). The header and the
    reference must both reproduce it, and the KRSC weight offsets must be where channels_last
    puts w[j, c, r, s]."""
    assert g.valid
    x = (torch.arange(g.N * g.H * g.W * g.C, dtype=torch.float64) + 1).view(g.N, g.H, g.W, g.C).permute(0, 3, 1, 2)
    cols = F.unfold(x, (g.R, g.S), dilation=(g.dh, g.dw), padding=(g.ph, g.pw), stride=(g.sh, g.sw))
    assert cols.shape == (g.N, g.C * g.R * g.S, g.P * g.Q), "torch's output size differs from the reference's"
    rng = random.Random(1)
    pairs = list(itertools.product(range(g.M), range(g.Kg)))
    if len(pairs) > 6000:
        pairs = rng.sample(pairs, 6000) + [(0, 0), (g.M - 1, g.Kg - 1), (0, g.Kg - 1), (g.M - 1, 0)]
    want = []
    for m, kk in pairs:
        n, pq = divmod(m, g.P * g.Q)
        r, s, c = g.tap(kk)
        want.append(int(cols[n, c * g.R * g.S + r * g.S + s, pq].item()) - 1)
    for (m, kk), w in zip(pairs, want):
        assert g.a_ref(m, kk) == w, f"{g} m={m} kk={kk}: the Python reference {g.a_ref(m, kk)} != torch {w}"
    out = conv_math([g.line()] + [f"a {m} {kk}" for m, kk in pairs])
    for (m, kk), w, line in zip(pairs, want, out[1:]):
        assert _ints(line)[8:] == (w, w), \
            f"{g} m={m} kk={kk}: header (a_offset, im2col_offset) {line.split()[8:]} != torch {w}"
    # weight: torch's channels_last [K, C, R, S] keeps w[j, c, r, s] at storage j*R*S*C + (r*S + s)*C + c
    wt = torch.arange(g.K * g.C * g.R * g.S, dtype=torch.float64).view(g.K, g.R, g.S, g.C).permute(0, 3, 1, 2)
    assert wt.is_contiguous(memory_format=torch.channels_last)
    bpairs = list(itertools.product(range(g.K), range(g.Kg)))
    out = conv_math([g.line()] + [f"b {j} {kk}" for j, kk in bpairs])
    for (j, kk), line in zip(bpairs, out[1:]):
        r, s, c = g.tap(kk)
        assert int(line) == int(wt[j, c, r, s].item()), f"{g}: b_offset(j={j}, kk={kk}) = {line}"


@pytest.mark.parametrize("g", [TORCH_GEOMS[0], TORCH_GEOMS[3], TORCH_GEOMS[8],
                               G(2, 15, 15, 8, 6, 5, 5, (3, 3), (2, 2), (1, 1)),
                               G(2, 7, 7, 3, 5, 3, 3, (2, 2), (1, 2), (1, 2))], ids=repr)
def test_implicit_gemm_computes_torch_conv2d(conv_math, g):
    """The whole GEMM view: gathering A and B through the header's offsets (0 where -1) and
    multiplying gives torch's conv2d, for random float64 data."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(g.N, g.C, g.H, g.W, dtype=torch.float64, generator=gen)
    w = torch.randn(g.K, g.C, g.R, g.S, dtype=torch.float64, generator=gen)
    x_flat = x.permute(0, 2, 3, 1).contiguous().flatten()  # NHWC storage
    w_flat = w.permute(0, 2, 3, 1).contiguous().flatten()  # KRSC storage
    apairs = list(itertools.product(range(g.M), range(g.Kg)))
    bpairs = list(itertools.product(range(g.K), range(g.Kg)))
    out = conv_math([g.line()] + [f"a {m} {kk}" for m, kk in apairs] + [f"b {j} {kk}" for j, kk in bpairs])
    aoff = torch.tensor([_ints(line)[9] for line in out[1:1 + len(apairs)]]).view(g.M, g.Kg)
    boff = torch.tensor([int(line) for line in out[1 + len(apairs):]]).view(g.K, g.Kg)
    A = torch.where(aoff >= 0, x_flat[aoff.clamp(min=0)], torch.zeros((), dtype=torch.float64))
    B = torch.where(boff >= 0, w_flat[boff.clamp(min=0)], torch.zeros((), dtype=torch.float64))
    y = (A @ B.T).view(g.N, g.P, g.Q, g.K).permute(0, 3, 1, 2)
    ref = F.conv2d(x, w, stride=(g.sh, g.sw), padding=(g.ph, g.pw), dilation=(g.dh, g.dw))
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


# Geometries whose NHWC offsets, rows or GEMM sizes pass 2^31 and 2^32.
LARGE_GEOMS = [
    G(256, 224, 224, 64, 64, 3, 3, (1, 1), (1, 1)),        # 8.2e8 elements: batch-256 ResNet 3x3, below 2^31
    G(1024, 224, 224, 64, 64, 3, 3, (1, 1), (1, 1)),       # 3.3e9: past 2^31
    G(2048, 224, 224, 64, 64, 7, 7, (2, 2), (3, 3)),       # 6.6e9: past 2^32
    G(256, 224, 224, 256, 128, 1, 1, (2, 2), (0, 0)),      # 1x1/2 projection, 3.3e9
    G(64, 1024, 1024, 1024, 2**19, 3, 3, (1, 1), (1, 1)),  # 6.9e10; K * Kg = 4.8e9 (weight past 2^32)
    G(3, 65537, 65539, 8, 8, 1, 3, (1, 1), (0, 1)),        # one image's H*W*C and P*Q past 2^32
    G(2**20, 7, 7, 512, 512, 3, 3, (1, 1), (1, 1), (2, 2)),  # M = 5.1e7, 2.6e10 elements
]


def _large_pairs(g, rng):
    ms = {0, 1, g.M - 1, g.M - 2, g.M, g.M + 1}
    for t in (2**31, 2**32, 2**33):
        n_t = -(-t // (g.H * g.W * g.C))  # first image whose base offset is >= t
        if n_t < g.N:
            ms |= {n_t * g.P * g.Q + d for d in (-1, 0, 1)}
    ms |= {rng.randrange(g.M) for _ in range(20)} | {g.M - 1 - rng.randrange(1000) for _ in range(10)}
    kks = sorted({0, g.C - 1, g.Kg - 1, g.Kg, g.Kg // 2} | {rng.randrange(g.Kg) for _ in range(4)})
    return [(m, kk) for m in sorted(ms) if m >= 0 for kk in kks]


def test_im2col_64bit_offsets(conv_math):
    """Offsets past 2^31 and 2^32 (a batch of 1024 or 2048 224x224x64 images, a single image with
    H*W past 2^32, a weight with K*Kg past 2^32), sampled at the ends of the GEMM and where the
    row's base offset crosses each power of two: a 32-bit product anywhere shows up here."""
    rng = random.Random(3)
    lines, plan, offs = [], [], []
    for g in LARGE_GEOMS:
        pairs = _large_pairs(g, rng)
        bpairs = [(j, kk) for j in (0, g.K // 2, g.K - 1, g.K) for kk in (0, g.Kg - 1, g.Kg)]
        lines += [g.line()] + _a_queries(g, *zip(*pairs)) + [f"b {j} {kk}" for j, kk in bpairs]
        plan.append((g, pairs, bpairs))
        offs += [g.a_ref(m, kk) for m, kk in pairs] + [g.b_ref(j, kk) for j, kk in bpairs]
    assert max(offs) > 2**34 and any(2**31 <= o < 2**32 for o in offs), "the sample must cross 2^31 and 2^32"
    out = conv_math(lines)
    i = 0
    for g, pairs, bpairs in plan:
        assert _ints(out[i]) == (g.M, g.Kg), f"{g}: gemm_m, gemm_k = {out[i]}"
        i += 1
        _check_a(g, pairs, out[i:i + len(pairs)])
        i += len(pairs)
        for (j, kk), line in zip(bpairs, out[i:i + len(bpairs)]):
            assert int(line) == g.b_ref(j, kk), f"{g}: b_offset(j={j}, kk={kk}) = {line}, want {g.b_ref(j, kk)}"
        i += len(bpairs)


_OUT_CASES = list(itertools.product([1, 2, 3, 4, 7, 15, 17, 33, 224], [1, 2, 3, 5, 7], [1, 2, 3], [0, 1, 2, 3],
                                    [1, 2, 3]))


def _torch_out(n, k, s, p, d):
    """torch's own verdict: the output side, or 0 when conv2d refuses the geometry."""
    try:
        return F.conv2d(torch.zeros(1, 1, n, 1), torch.zeros(1, 1, k, 1), stride=(s, 1), padding=(p, 0),
                        dilation=(d, 1)).shape[2]
    except RuntimeError:
        return 0


def test_out_size_valid_geometries(conv_math):
    """out_size (what the launcher sizes y and the GEMM with) is torch's output size wherever
    torch accepts the convolution."""
    cases = [c for c in _OUT_CASES if out_size_ref(*c) >= 1]
    got = conv_math([f"o {n} {k} {s} {p} {d}" for n, k, s, p, d in cases])
    for (n, k, s, p, d), line in zip(cases, got):
        want = _torch_out(n, k, s, p, d)
        assert want == out_size_ref(n, k, s, p, d)
        assert int(line) == want, f"out_size(in={n}, k={k}, stride={s}, pad={p}, dil={d}) = {line}, torch {want}"


def test_out_size_rejects_too_small_inputs(conv_math):
    """Where torch refuses the convolution (padded input smaller than the dilated filter),
    out_size must come out < 1: conv_bn_act.cu's prepare() relies on `P > 0 && Q > 0` to reject
    the call, and the registered op torch.ops.resnet_kernels.conv_bn_act_cuda can be called
    without the Python-side check_args."""
    cases = [c for c in _OUT_CASES if out_size_ref(*c) < 1]
    got = conv_math([f"o {n} {k} {s} {p} {d}" for n, k, s, p, d in cases])
    bad = []
    for (n, k, s, p, d), line in zip(cases, got):
        assert _torch_out(n, k, s, p, d) == 0, "torch accepts a geometry the floor rule calls empty"
        if int(line) >= 1:
            bad.append(f"out_size(in={n}, k={k}, stride={s}, pad={p}, dil={d}) = {line} "
                       f"(torch: invalid, floor rule {out_size_ref(n, k, s, p, d)})")
    assert not bad, (
        f"{len(bad)} geometries torch rejects get a positive output size from conv_math.cuh's out_size, "
        "so the launcher's `P > 0 && Q > 0` check lets them through and the kernel computes a conv torch "
        "refuses. Cause: C++ integer '/' truncates toward zero; (in + 2*pad - dil*(k-1) - 1) is negative "
        "but > -stride here, so the quotient is 0 and out_size returns 1 instead of floor() + 1 <= 0. "
        "First cases:\n  " + "\n  ".join(bad[:8]))


# --- 2. the shared-memory swizzle ---------------------------------------------------------------
ROWS = 256  # twice the tallest tile (BM = BN = 128 rows): every row a kernel addresses, and more


@pytest.fixture(scope="module")
def swizzle(conv_math):
    """se[row][col] = swizzle_elem, so[row][chunk] = swizzle_offset, for rows < 256."""
    lines = [f"se {r} {c}" for r in range(ROWS) for c in range(64)]
    lines += [f"sw {r} {c}" for r in range(ROWS) for c in range(8)]
    out = [int(v) for v in conv_math(lines)]
    se = np.array(out[:ROWS * 64], dtype=np.int64).reshape(ROWS, 64)
    so = np.array(out[ROWS * 64:], dtype=np.int64).reshape(ROWS, 8)
    return se, so


def test_tile_constants(conv_math):
    """The swizzle, the ldmatrix maps and the descriptor below assume a 64-element (128-byte)
    fp16/bf16 row of 8 16-byte chunks per stage."""
    assert _ints(conv_math(["k"])[0]) == (64, 128, 8)


def test_swizzle_is_a_bijection(swizzle):
    """No two elements of a rows x 64 tile share a byte, and the tile fills exactly rows*128 bytes
    (a stage's A or B region), for every tile height the kernels use."""
    se, so = swizzle
    for rows in (8, 16, 64, 128, 192, 256):
        offs = se[:rows].ravel()
        assert sorted(offs.tolist()) == list(range(0, rows * 128, 2)), f"swizzle_elem: no bijection for {rows} rows"
        chunks = so[:rows].ravel()
        assert sorted(chunks.tolist()) == list(range(0, rows * 128, 16)), f"swizzle_offset: no bijection, {rows} rows"
    # swizzle_elem is swizzle_offset plus the element's place in its (unpermuted) 16-byte chunk
    rr, cc = np.meshgrid(np.arange(ROWS), np.arange(64), indexing="ij")
    assert (se == so[rr, cc // 8] + (cc % 8) * 2).all()


def test_swizzle_is_cutlass_128b_pattern(swizzle):
    """Hopper's 128B-swizzle mode (wgmma descriptors, TMA) and CUTLASS's Swizzle<3,4,3> on byte
    addresses: the 16-byte chunk index (address bits 4-6) XOR the row within its 8-row,
    1024-byte block (bits 7-9); rows stay in their 1024-byte block and their 128-byte line."""
    se, so = swizzle
    rr, cc = np.meshgrid(np.arange(ROWS), np.arange(64), indexing="ij")
    linear = rr * 128 + cc * 2
    assert (se == (linear ^ ((linear & 0x380) >> 3))).all(), "not cute::Swizzle<3,4,3> of the row-major byte address"
    r8, ch = np.meshgrid(np.arange(ROWS), np.arange(8), indexing="ij")
    assert (so // 1024 == r8 // 8).all() and ((so % 1024) // 128 == r8 % 8).all()
    assert ((so % 128) // 16 == (ch ^ (r8 % 8))).all()


def _bank_groups(addrs):
    return [(a // 16) % 8 for a in addrs]


def test_swizzle_conflict_free_for_any_8_rows(swizzle):
    """An ldmatrix 8x8 matrix is 8 row addresses at one logical chunk: for any 8 consecutive rows
    and any chunk they hit 8 distinct 16-byte bank groups, so each ldmatrix phase is one shared
    memory wavefront. (Unswizzled 128-byte rows would be an 8-way conflict: the check has teeth.)"""
    se, so = swizzle
    for r0 in range(ROWS - 7):
        for chunk in range(8):
            groups = _bank_groups(so[r0:r0 + 8, chunk])
            assert len(set(groups)) == 8, f"rows {r0}..{r0 + 7} chunk {chunk}: bank groups {groups}"
    assert len(set(_bank_groups([r * 128 + 3 * 16 for r in range(8)]))) == 1


def test_cp_async_stores_conflict_free(swizzle):
    """The loaders' 16-byte stores: thread t of a CTA writes chunk t % 8 of rows t / 8 + i *
    (THREADS / 8), so a warp writes 4 whole rows (512 contiguous bytes) and each 8-thread phase
    one whole row: 8 distinct bank groups, for every tile config's thread count and row."""
    _, so = swizzle
    for threads in sorted({c[2] * c[3] * 32 for c in _sm80_configs()} | {256}):
        for i in range(128 // (threads // 8)):
            for warp in range(threads // 32):
                addrs = [int(so[t // 8 + i * (threads // 8), t % 8]) for t in range(32 * warp, 32 * warp + 32)]
                lo = min(addrs)
                assert sorted(addrs) == list(range(lo, lo + 512, 16)), f"{threads} threads, warp {warp}: not 4 rows"
                for ph in range(4):
                    groups = _bank_groups(addrs[8 * ph:8 * ph + 8])
                    assert len(set(groups)) == 8, f"{threads} threads warp {warp} phase {ph}: bank groups {groups}"


# --- kernel configurations, read from the kernels so the simulation follows them --------------
def _norm(text):
    return re.sub(r"\s+", " ", text)


def _sm80_configs():
    src = SM80_SRC.read_text()
    pattern = r"Sm80Config<\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\s*>;"
    cfgs = [tuple(map(int, m)) for m in re.findall(pattern, src)]
    assert cfgs, f"no `using ... = Sm80Config<BM, BN, WARPS_M, WARPS_N, STAGES>;` found in {SM80_SRC}"
    return cfgs


def _sm90_configs():
    src = SM90_SRC.read_text()
    assert "static constexpr int BM = 128" in src, "the sm_90a tile height changed: update this test"
    cfgs = [tuple(map(int, m)) for m in re.findall(r"Sm90Config<\s*(\d+),\s*(\d+)\s*>;", src)]
    assert cfgs, f"no `using ... = Sm90Config<BN, STAGES>;` found in {SM90_SRC}"
    return cfgs


def test_kernels_use_the_maps_as_simulated():
    """The simulations below mirror these lines of the kernels (register order of the B ldmatrix,
    the float2 accumulator write-back, the wgmma accumulator index); if a kernel changes them the
    simulation must change too."""
    sm80, sm90 = _norm(SM80_SRC.read_text()), _norm(SM90_SRC.read_text())
    for snippet in [
        "const uint32_t row = wm * Cfg::WTM + i * 16 + ldsm_a_row(lane);",
        "const uint32_t col = k16 * 16 + ldsm_a_col(lane);",
        "ldsm_x4(a_s + swizzle_elem(row, col), af[i][0], af[i][1], af[i][2], af[i][3]);",
        "const uint32_t row = wn * Cfg::WTN + j * 16 + ldsm_b_row(lane);",
        "const uint32_t col = k16 * 16 + ldsm_b_col(lane);",
        "ldsm_x4(b_s + swizzle_elem(row, col), bf[2 * j][0], bf[2 * j][1], bf[2 * j + 1][0], bf[2 * j + 1][1]);",
        "mma_16816<T>(acc[i][j], af[i], bf[j]);",
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
        "const int row = wm * Cfg::WTM + i * 16 + acc_row(lane, 2 * h);",
        "const int col = wn * Cfg::WTN + j * 8 + acc_col(lane, 2 * h);",
        "make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1])",
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
    ]:
        assert _norm(snippet) in sm80, f"conv_sm80.cuh no longer contains `{snippet}`"
    for snippet in [
        "const int row = wg * 64 + warp_in_wg * 16 + acc_row(lane, 2 * h);",
        "const int col = j * 8 + acc_col(lane, 2 * h);",
        "make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1])",
        "wgmma_desc(a_s + k16 * 32), wgmma_desc(b_s + k16 * 32)",
        "const uint32_t a_s = stage_a(s) + wg * 64 * kRowBytes, b_s = stage_b(s);",
    ]:
        assert _norm(snippet) in sm90, f"conv_sm90.cuh no longer contains `{snippet}`"


# --- 3. thread -> fragment maps -----------------------------------------------------------------
@pytest.fixture(scope="module")
def frag(conv_math):
    """Per lane: ldsm_a_row, ldsm_a_col, ldsm_b_row, ldsm_b_col, then (acc_row, acc_col) for i < 4."""
    rows = [_ints(v) for v in conv_math([f"f {lane}" for lane in range(32)])]
    return {
        "a": [(r[0], r[1]) for r in rows],
        "b": [(r[2], r[3]) for r in rows],
        "acc": [[(r[4 + 2 * i], r[5 + 2 * i]) for i in range(4)] for r in rows],
    }


# The PTX ISA's fragment layouts of mma.m16n8k16 with .f16/.bf16 (see the module docstring).
def isa_a(lane, i):
    g, t = lane >> 2, lane % 4
    return g + (8 if i in (2, 3, 6, 7) else 0), t * 2 + (i & 1) + (8 if i >= 4 else 0)  # (m, k)


def isa_b(lane, i):
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g  # (k, n)


def isa_c(lane, i):
    g, t = lane >> 2, lane % 4
    return g + (8 if i >= 2 else 0), t * 2 + (i & 1)  # (m, n)


def ldmatrix_x4(addrs, mem):
    """ldmatrix.sync.aligned.m8n8.x4.shared.b16 per the ISA: lanes 8q..8q+7 give the row
    addresses of matrix q; thread t receives row t/4, 16-bit elements 2*(t%4) and +1 of every
    matrix q into its register q. mem maps a byte address to what the 2-byte element there is.
    Returns regs[t][q] = (low element, high element)."""
    assert len(addrs) == 32 and all(a % 16 == 0 for a in addrs), "ldmatrix row addresses must be 16-byte aligned"
    return [[(mem[addrs[8 * q + t // 4] + 4 * (t % 4)], mem[addrs[8 * q + t // 4] + 4 * (t % 4) + 2])
             for q in range(4)] for t in range(32)]


def _stage_layout(cfg):
    bm, bn, wm_, wn_, stages = cfg
    a_bytes, b_bytes = bm * 128, bn * 128
    return [(s * (a_bytes + b_bytes), s * (a_bytes + b_bytes) + a_bytes) for s in range(stages)]


def _smem_labels(se, base, rows):
    """What the loaders left in shared memory: logical element (row, col) of the tile at
    base + swizzle_elem(row, col) (cp.async / st.shared write chunk c of row r at swizzle_offset)."""
    return {base + int(se[r, c]): (r, c) for r in range(rows) for c in range(64)}


def test_acc_map_is_isa_c_fragment(frag):
    """acc_row/acc_col(lane, i) is where the PTX ISA puts c_i of mma.m16n8k16 (row groupID, +8
    for i >= 2; column 2*threadID_in_group + (i & 1)). (ldsm_* are checked by composition below:
    what matters is what the registers end up holding.)"""
    for lane in range(32):
        for i in range(4):
            assert frag["acc"][lane][i] == isa_c(lane, i), f"acc_row/acc_col(lane={lane}, i={i}) = " \
                f"{frag['acc'][lane][i]}, PTX ISA C fragment says {isa_c(lane, i)}"


@pytest.mark.parametrize("cfg", _sm80_configs(), ids=lambda c: "Sm80Config<%d,%d,%d,%d,%d>" % c)
def test_ldmatrix_a_gives_mma_a_fragments(swizzle, frag, cfg):
    """Compose: the sm_80 kernel's ldmatrix.x4 at (row = wm*WTM + i*16 + ldsm_a_row(lane),
    col = k16*16 + ldsm_a_col(lane)) on the swizzled A tile leaves in each lane's af[i][0..3]
    exactly the mma.m16n8k16 A fragment a0..a7 that lane must hold, for every warp, m16 block,
    k16 step and pipeline stage; each 8-lane phase is conflict-free."""
    se, _ = swizzle
    bm, bn, wm_n, wn_n, _ = cfg
    wtm = bm // wm_n
    for a_base, _b in _stage_layout(cfg):
        mem = _smem_labels(se, a_base, bm)
        for warp in range(wm_n * wn_n):
            wm = warp // wn_n
            for i in range(wtm // 16):
                for k16 in range(4):
                    addrs = [a_base + int(se[wm * wtm + i * 16 + frag["a"][l][0], k16 * 16 + frag["a"][l][1]])
                             for l in range(32)]
                    for q in range(4):
                        groups = _bank_groups(addrs[8 * q:8 * q + 8])
                        assert len(set(groups)) == 8, \
                            f"{cfg} warp {warp} i={i} k16={k16} matrix {q}: bank groups {groups}"
                    regs = ldmatrix_x4(addrs, mem)
                    for t in range(32):
                        for q in range(4):
                            want = tuple((wm * wtm + i * 16 + isa_a(t, e)[0], k16 * 16 + isa_a(t, e)[1])
                                         for e in (2 * q, 2 * q + 1))
                            assert regs[t][q] == want, (
                                f"{cfg} warp {warp} i={i} k16={k16} lane {t}: af[{q}] holds A{regs[t][q]}, "
                                f"mma.m16n8k16 wants a{2 * q},a{2 * q + 1} = A{want}")


@pytest.mark.parametrize("cfg", _sm80_configs(), ids=lambda c: "Sm80Config<%d,%d,%d,%d,%d>" % c)
def test_ldmatrix_b_gives_mma_b_fragments(swizzle, frag, cfg):
    """Compose for B (stored [n][k], k contiguous): ldmatrix.x4 at (row = wn*WTN + j*16 +
    ldsm_b_row(lane), col = k16*16 + ldsm_b_col(lane)) into bf[2j][0], bf[2j][1], bf[2j+1][0],
    bf[2j+1][1] (registers 0..3) gives both n8 tiles' mma.m16n8k16 B fragments: b0,b1 = k
    2*(t%4)+{0,1}, n = t/4, and b2,b3 = k+8."""
    se, _ = swizzle
    bm, bn, wm_n, wn_n, _ = cfg
    wtn = bn // wn_n
    for _a, b_base in _stage_layout(cfg):
        mem = _smem_labels(se, b_base, bn)
        for warp in range(wm_n * wn_n):
            wn = warp % wn_n
            for j in range(wtn // 16):
                for k16 in range(4):
                    addrs = [b_base + int(se[wn * wtn + j * 16 + frag["b"][l][0], k16 * 16 + frag["b"][l][1]])
                             for l in range(32)]
                    for q in range(4):
                        groups = _bank_groups(addrs[8 * q:8 * q + 8])
                        assert len(set(groups)) == 8, \
                            f"{cfg} warp {warp} j={j} k16={k16} matrix {q}: bank groups {groups}"
                    regs = ldmatrix_x4(addrs, mem)
                    for t in range(32):
                        for q in range(4):
                            jj, breg = 2 * j + q // 2, q % 2  # register q is bf[2j + q/2][q%2]
                            want = tuple((wn * wtn + jj * 8 + isa_b(t, e)[1], k16 * 16 + isa_b(t, e)[0])
                                         for e in (2 * breg, 2 * breg + 1))
                            assert regs[t][q] == want, (
                                f"{cfg} warp {warp} j={j} k16={k16} lane {t}: bf[{jj}][{breg}] holds "
                                f"B[n,k]={regs[t][q]}, "
                                f"mma.m16n8k16 wants b{2 * breg},b{2 * breg + 1} = B[n,k]={want}")


def test_accumulator_write_back_sm80(frag):
    """The kernel stores acc[i][j][2h], acc[i][j][2h+1] as one float2 at (acc_row(lane, 2h),
    acc_col(lane, 2h)): element e must land on the ISA's C/D position of c_e, and the two halves
    of each float2 must be adjacent columns of one row; the 32 lanes cover the 16x8 tile once."""
    seen = set()
    for lane in range(32):
        for h in range(2):
            r, c = frag["acc"][lane][2 * h]
            for e in range(2):
                assert (r, c + e) == isa_c(lane, 2 * h + e), \
                    f"lane {lane}: acc[{2 * h + e}] written to {(r, c + e)}, " \
                    f"the ISA puts c{2 * h + e} at {isa_c(lane, 2 * h + e)}"
                seen.add((r, c + e))
            assert c % 2 == 0, "float2 store must be 8-byte aligned"
    assert seen == {(r, c) for r in range(16) for c in range(8)}


def cute_clayout_64xN(tid, v):
    """CUTLASS GMMA::CLayout_64xN = ((4,8,4),(2,2,N/8)):((128,1,16),(64,8,512)), the textual
    form of the ISA's wgmma .m64nNk16 accumulator figure: (thread, value) -> offset in a
    column-major 64 x N tile. Returns (m, n)."""
    t0, t1, t2 = tid % 4, (tid // 4) % 8, tid // 32
    v0, v1, v2 = v % 2, (v // 2) % 2, v // 4
    off = 128 * t0 + 1 * t1 + 16 * t2 + 64 * v0 + 8 * v1 + 512 * v2
    return off % 64, off // 64


@pytest.mark.parametrize("cfg", _sm90_configs(), ids=lambda c: "Sm90Config<%d,%d>" % c)
def test_wgmma_accumulator_write_back_sm90(frag, cfg):
    """The sm_90a kernel writes acc[4j + 2h + {0,1}] of warp w of the warpgroup to row 16w +
    acc_row(lane, 2h), column 8j + acc_col(lane, 2h) + {0,1}: that must be the wgmma m64nNk16
    fp32 accumulator layout for N = BN, and the 128 threads must cover the 64 x N tile once."""
    bn = cfg[0]
    seen = set()
    for tid in range(128):
        warp, lane = tid // 32, tid % 32
        for a in range(bn // 2):
            j, h, e = a // 4, (a // 2) % 2, a % 2
            r, c = frag["acc"][lane][2 * h]
            got = (warp * 16 + r, j * 8 + c + e)
            assert got == cute_clayout_64xN(tid, a), \
                f"N={bn} thread {tid}: acc[{a}] written to {got}, " \
                f"wgmma's D layout has d{a} at {cute_clayout_64xN(tid, a)}"
            seen.add(got)
    assert seen == {(r, c) for r in range(64) for c in range(bn)}


def _mma_index_arrays():
    ia = np.array([[isa_a(t, i) for i in range(8)] for t in range(32)])  # (32, 8, 2)
    ib = np.array([[isa_b(t, i) for i in range(4)] for t in range(32)])
    ic = np.array([[isa_c(t, i) for i in range(4)] for t in range(32)])
    return ia, ib, ic


@pytest.mark.parametrize("cfg", _sm80_configs(), ids=lambda c: "Sm80Config<%d,%d,%d,%d,%d>" % c)
def test_sm80_ctatile_end_to_end(swizzle, frag, cfg):
    """The whole sm_80 inner loop of one 64-wide k tile, numerically: the loaders' swizzled
    stores, ldmatrix.x4 into af/bf as the kernel assigns them, mma.m16n8k16 as the ISA defines
    it (D = A[16x16] * B[16x8] from the fragments' ISA positions, D back to c0..c3), and the
    float2 write-back through acc_row/acc_col must give the CTA's tile A @ B^T exactly."""
    se, _ = swizzle
    bm, bn, wm_n, wn_n, _ = cfg
    wtm, wtn = bm // wm_n, bn // wn_n
    rng = np.random.default_rng(4)
    A = rng.integers(-8, 8, (bm, 64))
    B = rng.integers(-8, 8, (bn, 64))
    a_smem = np.zeros(bm * 64, dtype=np.int64)
    b_smem = np.zeros(bn * 64, dtype=np.int64)
    a_smem[se[:bm].ravel() // 2] = A.ravel()
    b_smem[se[:bn].ravel() // 2] = B.ravel()
    ia, ib, ic = _mma_index_arrays()
    lanes = np.arange(32)
    src_lane = np.array([[8 * q + t // 4 for q in range(4)] for t in range(32)])  # (32, 4)
    in_row = (lanes % 4) * 4  # byte offset of thread t's pair within the row

    def ldsm(smem, addrs):  # -> (32 threads, 8 halves) in register order r0.lo, r0.hi, r1.lo, ...
        base = addrs[src_lane] + in_row[:, None]  # (32, 4)
        both = np.stack([smem[base // 2], smem[base // 2 + 1]], axis=-1)
        return both.reshape(32, 8)

    tile = np.full((bm, bn), np.iinfo(np.int64).min)
    arow = np.array([f[0] for f in frag["a"]])
    acol = np.array([f[1] for f in frag["a"]])
    brow = np.array([f[0] for f in frag["b"]])
    bcol = np.array([f[1] for f in frag["b"]])
    for warp in range(wm_n * wn_n):
        wm, wn = warp // wn_n, warp % wn_n
        acc = np.zeros((wtm // 16, wtn // 8, 32, 4), dtype=np.int64)
        for k16 in range(4):
            af = [ldsm(a_smem, se[wm * wtm + i * 16 + arow, k16 * 16 + acol]) for i in range(wtm // 16)]
            bf = []
            for j in range(wtn // 16):
                r = ldsm(b_smem, se[wn * wtn + j * 16 + brow, k16 * 16 + bcol])
                bf += [r[:, 0:4], r[:, 4:8]]  # bf[2j] = registers 0, 1; bf[2j+1] = registers 2, 3
            for i in range(wtm // 16):
                a16 = np.zeros((16, 16), dtype=np.int64)
                a16[ia[..., 0], ia[..., 1]] = af[i]
                for j in range(wtn // 8):
                    b16 = np.zeros((16, 8), dtype=np.int64)
                    b16[ib[..., 0], ib[..., 1]] = bf[j]
                    acc[i, j] += (a16 @ b16)[ic[..., 0], ic[..., 1]]
        for i in range(wtm // 16):
            for j in range(wtn // 8):
                for lane in range(32):
                    for h in range(2):
                        r, c = frag["acc"][lane][2 * h]
                        row, col = wm * wtm + i * 16 + r, wn * wtn + j * 8 + c
                        tile[row, col:col + 2] = acc[i, j, lane, 2 * h:2 * h + 2]
    np.testing.assert_array_equal(tile, A @ B.T)


# --- 4. the wgmma descriptor --------------------------------------------------------------------
def _isa_desc(addr, lbo, sbo, base_offset, swizzle_mode):
    enc = lambda x: (x & 0x3FFFF) >> 4  # noqa: E731  (the ISA's matrix-descriptor-encode)
    return enc(addr) | enc(lbo) << 16 | enc(sbo) << 32 | base_offset << 49 | swizzle_mode << 62


def _sm90_descriptor_addresses():
    addrs = set()
    for bn, stages in _sm90_configs():
        a_bytes, b_bytes = 128 * 128, bn * 128
        assert a_bytes % 1024 == 0 and b_bytes % 1024 == 0
        for smem_base in (0, 1024, 37 * 1024):
            for s in range(stages):
                stage_a = smem_base + s * (a_bytes + b_bytes)
                for k16 in range(4):
                    addrs |= {stage_a + wg * 64 * 128 + k16 * 32 for wg in range(2)} | {stage_a + a_bytes + k16 * 32}
    return sorted(addrs)


def test_wgmma_descriptor_fields(conv_math):
    """wgmma_desc per the ISA's matrix-descriptor format for a K-major operand in the 128-Byte
    swizzle: start address encoded in bits 0-13, leading byte offset 16 (encoded 1: unused for
    swizzled K-major) in 16-29, stride byte offset 1024 (8 rows of 128 bytes) in 32-45, base
    offset 0 (every tile the sm_90a kernel describes starts its pattern on a 1024-byte boundary)
    in 49-51, swizzle mode 1 = 128-Byte in 62-63, nothing else set; for every address the kernel
    builds one from, and addresses at the top of and past the 18-bit window."""
    addrs = _sm90_descriptor_addresses() + [0, 16, 1024, 0x12340, 227 * 1024, 0x3FFF0, 0x40000, 0x40010, 0xFFFFFFF0]
    got = [int(v) for v in conv_math([f"d {a}" for a in addrs])]
    for a, d in zip(addrs, got):
        want = _isa_desc(a, 16, 1024, 0, 1)
        assert d == want, f"wgmma_desc({a:#x}) = {d:#018x}, the ISA's fields give {want:#018x}"
        assert (d & 0x3FFF) << 4 == a & 0x3FFF0
        assert (d >> 16) & 0x3FFF == 1 and ((d >> 32) & 0x3FFF) << 4 == 8 * 128
        assert (d >> 49) & 0x7 == 0 and d >> 62 == 1
        assert d & ~(0x3FFF | 0x3FFF << 16 | 0x3FFF << 32 | 0x7 << 49 | 0x3 << 62) == 0, f"reserved bits set in {d:#x}"
    for a in _sm90_descriptor_addresses():  # tiles sit on 1024-byte boundaries (+32 bytes per k16 step)
        assert (a % 1024) in (0, 32, 64, 96)


# --- 5. residual offsets ----------------------------------------------------------------------
def _views(shape):
    """(name, residual view [N, K, P, Q]) over real storage whose values are storage indices."""
    n, k, p, q = shape

    def base(*s):
        return torch.arange(math.prod(s), dtype=torch.float64).view(*s)

    return [
        ("nchw", base(n, k, p, q)),
        ("channels_last", base(n, p, q, k).permute(0, 3, 1, 2)),
        ("transposed", base(n, p, k, q).transpose(1, 2)),
        ("sliced", base(n + 1, 2 * k, p + 3, 2 * q + 1)[1:, ::2, 1:p + 1, 1::2]),
        ("spatial_transposed", base(n, k, q, p).transpose(2, 3)),
        ("broadcast_bias", base(1, k, 1, 1).expand(n, k, p, q)),
        ("broadcast_batch", base(1, p, q, k).permute(0, 3, 1, 2).expand(n, k, p, q)),
    ]


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 8, 7, 7), (3, 16, 1, 6), (2, 5, 3, 1), (3, 20, 15, 15)])
def test_residual_offsets_match_torch_views(conv_math, shape):
    """For every output element (m = (n, p, q), channel j), residual_offset at the view's strides
    plus its storage offset is where torch keeps residual[n, j, p, q]: dense NHWC or NCHW,
    permuted, sliced with steps, broadcast."""
    n_, k_, p_, q_ = shape
    g = G(n_, p_, q_, 8, k_, 1, 1)  # a 1x1 stride-1 conv: P, Q = the residual's spatial size
    assert (g.P, g.Q) == (p_, q_)
    lines, want = [g.line()], []
    for name, r in _views(shape):
        assert tuple(r.shape) == shape
        st = r.stride()
        flat = r.contiguous().flatten()
        for m in range(g.M):
            n, p, q = g.row(m)
            for j in range(k_):
                lines.append(f"r {m} {j} {' '.join(map(str, st))}")
                want.append((name, m, j, int(flat[((n * k_ + j) * p_ + p) * q_ + q].item()) - r.storage_offset()))
    out = conv_math(lines)[1:]
    for (name, m, j, off), line in zip(want, out):
        assert int(line) == off, f"{shape} view={name} m={m} j={j}: residual_offset {line} != torch {off}"


def test_residual_offsets_64bit(conv_math):
    """Residual offsets past 2^32 (a 256 x 2048 x 56 x 56 residual, dense either way or a strided
    slice of one twice as large), at the ends and random elements."""
    rng = random.Random(5)
    lines, want = [], []
    for n, k, p, q in [(256, 2048, 56, 56), (1024, 512, 28, 28), (3, 8, 65537, 65539)]:
        g = G(n, p, q, 8, k, 1, 1)
        lines.append(g.line())
        for st in [(k * p * q, p * q, q, 1), (p * q * k, 1, q * k, k), (8 * k * p * q, 2 * p * q * 2, 4 * q, 2)]:
            for m in [0, g.M - 1, g.M // 2] + [rng.randrange(g.M) for _ in range(10)]:
                for j in (0, k - 1, rng.randrange(k)):
                    nn, pp, qq = g.row(m)
                    lines.append(f"r {m} {j} {' '.join(map(str, st))}")
                    want.append((len(lines) - 1, nn * st[0] + j * st[1] + pp * st[2] + qq * st[3]))
    assert max(w for _, w in want) > 2**33
    out = conv_math(lines)
    for idx, off in want:
        assert int(out[idx]) == off, f"{lines[idx]}: residual_offset {out[idx]} != {off}"
