"""64-bit indexing on CPU: a tensor of more than 2^31 elements through the torch backend.

x is fp16 [1, 1, 65536, 32769] = 2,147,549,184 elements (> 2^31 = 2,147,483,648; 4.3 GB), a 3x3
stride-3 convolution to one channel with BN, an expand()ed residual (stride 0) and ReLU: the output
is ~2.4e8 elements; the process peaks at 9.6 GB (the fp16 CPU convolution unfolds x once).
x[h, w] = a[h] + b[w] with random a, b, so an element read from a wrong row or column gives a different value. Checked against float64 at
sampled output positions, including the last rows and columns (whose inputs lie beyond 2^31).
Skipped with the reason when the machine has too little free memory.

The GPU backends' > 2^31 check is tests/test_gpu_kernels.py::test_64bit_index_input_and_output_over_2pow31
(run by scripts/device_check.sh). The Triton interpreter is not tractable at this size (numpy per
program over billions of elements), so it is not run here.
"""
import pytest
import torch

import resnet_kernels as rk

H, W = 65536, 32769
NEED_GIB = 11.5  # measured peak RSS of the test process: 9.6 GB (x, the fp16 conv's im2col buffer, the epilogue)


def _mem_available_gib():
    try:
        import psutil
        return psutil.virtual_memory().available / 2**30
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    return 0.0


@pytest.mark.slow
def test_torch_backend_input_over_2pow31_elements():
    free = _mem_available_gib()
    if free < NEED_GIB:
        pytest.skip(f"needs {NEED_GIB:.0f} GiB of free memory for a 2^31-element fp16 tensor and the call, "
                    f"{free:.1f} GiB available")
    assert H * W > 2**31
    g = torch.Generator().manual_seed(0)
    a = torch.randn(H, 1, generator=g, dtype=torch.float64)
    b = torch.randn(1, W, generator=g, dtype=torch.float64)
    x = torch.empty(1, 1, H, W, dtype=torch.float16)
    torch.add(a.half(), b.half(), out=x.view(H, W))  # x[h, w] = fp16(fp16(a[h]) + fp16(b[w])): one pass
    w = (torch.randn(1, 1, 3, 3, generator=g) / 3).half()
    scale, shift = torch.tensor([1.75]), torch.tensor([0.125])
    p, q = (H + 2 - 3) // 3 + 1, (W + 2 - 3) // 3 + 1
    res_col = torch.randn(1, 1, p, 1, generator=g).half()
    residual = res_col.expand(1, 1, p, q)  # stride 0 along Q
    with torch.no_grad():
        y = rk.fused_conv_bn_act(x, w, scale, shift, residual, stride=3, padding=1, relu=True, backend="torch")
    assert y.shape == (1, 1, p, q) and y.dtype == torch.float16 and y.is_contiguous()

    # sampled output positions: corners, the last rows/columns, and random ones
    rows = torch.cat([torch.tensor([0, 1, p // 2, p - 2, p - 1]), torch.randint(0, p, (60,), generator=g)])
    cols = torch.cat([torch.tensor([0, q - 1, q // 2, 1, q - 2]), torch.randint(0, q, (60,), generator=g)])
    rows = torch.cat([rows, torch.full((5,), p - 1)])
    cols = torch.cat([cols, torch.randint(0, q, (5,), generator=g)])
    want, got = [], []
    w64 = w.double()[0, 0]
    for i, j in zip(rows.tolist(), cols.tolist()):
        h0, w0 = 3 * i - 1, 3 * j - 1  # the window's top-left corner in x (padding 1)
        win = torch.zeros(3, 3, dtype=torch.float64)
        hs, he, ws, we = max(h0, 0), min(h0 + 3, H), max(w0, 0), min(w0 + 3, W)
        win[hs - h0:he - h0, ws - w0:we - w0] = x[0, 0, hs:he, ws:we].double()
        v = (win * w64).sum() * scale.double() + shift.double() + res_col[0, 0, i, 0].double()
        want.append(v.clamp_min(0.0).item())
        got.append(y[0, 0, i, j].double().item())
    want, got = torch.tensor(want), torch.tensor(got)
    e = ((got - want).abs().max() / (want.abs().max() + 1e-6)).item()
    assert e <= 5e-3, f"max relative error {e:.3g} at sampled positions (fp16 floor 5e-3)"
    # the tail of the output really was written (a wrapped 32-bit offset would leave it stale)
    assert torch.isfinite(y[0, 0, -3:]).all() and (y[0, 0, -3:] != 0).any()
