"""Training-step benchmark: forward + backward + SGD step of a torchvision ResNet, converted by
resnet_kernels vs eager and torch.compile, side by side in one process, with peak memory.

    python benchmarks/bench_train.py [--quick] [--out DIR] [--device cpu|cuda] [--amp]

Every provider trains its own copy of the same model on the same real-photo batches
(scikit-image samples, random-resized crops). Rounds are interleaved (eager, compile, converted,
eager, ...) so machine noise hits all alike; the first round of each is warm-up (and compile).
The converted model's loss is checked against eager's on the first step. Writes a CSV (one row per
provider) into DIR (default bench_out/<cpu|cuda>/, git-ignored; the committed results use --out benchmarks/results/<cpu|cuda>) and prints a table.

On GPU: channels_last, optional AMP (`--amp`, bf16 or fp16), peak memory from
torch.cuda.max_memory_allocated per provider. On CPU: peak RSS growth is not separable per
provider in one process, so the memory column is the tensor memory a step keeps for backward
(saved activations), measured with torch.autograd.graph.saved_tensors_hooks.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (device_name, format_table, git_commit, load_photos, package_version,  # noqa: E402
                               percentile, photo_batch, timestamp)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="resnet18, small batch and images, few rounds")
    p.add_argument("--model", default=None, help="torchvision model (default resnet50; resnet18 with --quick)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default=None, choices=("bf16", "fp16"), help="autocast dtype (default: fp32)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def saved_bytes(step_fn):
    """Bytes of tensors autograd saves for backward during one forward (distinct storages)."""
    import torch

    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_fn()
    return sum(seen.values())


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F
    import torchvision
    from tqdm import tqdm

    import resnet_kernels as rk

    quick = args.quick
    model_name = args.model or ("resnet18" if quick else "resnet50")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible: run with --device cpu")
        return 0
    batch = args.batch or (4 if quick and dev.type == "cpu" else 8 if dev.type == "cpu" else 256)
    size = args.size or (112 if quick and dev.type == "cpu" else 224)
    rounds = args.rounds or (3 if quick else 6)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]

    torch.manual_seed(0)
    base = getattr(torchvision.models, model_name)(num_classes=100).to(dev)
    fmt = torch.channels_last
    photos = load_photos()
    batches = [photo_batch(photos, batch, size, seed=i).to(dev).contiguous(memory_format=fmt) for i in range(2)]
    labels = torch.arange(batch, device=dev) % 100

    def make(kind):
        m = copy.deepcopy(base).train().to(memory_format=fmt)
        if kind == "resnet_kernels":
            m = rk.convert(m, backend=args.backend).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        fwd = torch.compile(m) if kind == "torch.compile" else m
        scaler = torch.amp.GradScaler(dev.type) if amp == torch.float16 else None

        def step(i):
            x = batches[i % len(batches)]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(fwd(x), labels)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            return loss.detach()

        def forward_only():
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                return F.cross_entropy(m(batches[0]), labels)

        return m, step, forward_only

    kinds = ["eager"] + ([] if args.no_compile else ["torch.compile"]) + ["resnet_kernels"]
    providers = {k: make(k) for k in kinds}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = {k: [] for k in kinds}
    peak = {k: None for k in kinds}
    first_loss = {}
    compile_s = None
    for r in tqdm(range(rounds + 1), desc=f"{model_name} train step", unit="round"):
        for k in kinds:
            _, step, _ = providers[k]
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            loss = step(r)
            sync()
            dt = time.perf_counter() - t0
            if r == 0:
                first_loss[k] = loss.item()
                if k == "torch.compile":
                    compile_s = dt
            else:
                times[k].append(dt)
            if dev.type == "cuda":
                peak[k] = max(peak[k] or 0, torch.cuda.max_memory_allocated())
    if dev.type == "cpu":
        for k in kinds:
            if k != "torch.compile":
                peak[k] = saved_bytes(providers[k][2])

    loss_gap = abs(first_loss["resnet_kernels"] - first_loss["eager"]) / max(abs(first_loss["eager"]), 1e-12)
    med = {k: percentile(v, 50) for k, v in times.items()}
    env = dict(device=device_name(dev), torch=torch.__version__, triton=package_version("triton"),
               cuda=torch.version.cuda or "", commit=git_commit(), timestamp=timestamp(),
               threads=torch.get_num_threads())
    rows, csv_rows = [], []
    for k in kinds:
        v = times[k]
        mem = peak[k]
        rows.append([k, f"{med[k] * 1e3:.1f}", f"{percentile(v, 20) * 1e3:.1f}-{percentile(v, 80) * 1e3:.1f}",
                     f"{med['eager'] / med[k]:.2f}x",
                     "" if mem is None else f"{mem / 2**20:.0f}"])
        csv_rows.append(dict(model=model_name, provider=k, batch=batch, size=size, amp=args.amp or "fp32",
                             backend=args.backend if k == "resnet_kernels" else "", median_ms=med[k] * 1e3,
                             p20_ms=percentile(v, 20) * 1e3, p80_ms=percentile(v, 80) * 1e3,
                             speedup_vs_eager=med["eager"] / med[k],
                             memory_mib="" if mem is None else mem / 2**20,
                             memory_kind="cuda peak allocated" if dev.type == "cuda" else "saved for backward",
                             first_loss=first_loss[k], compile_s=compile_s if k == "torch.compile" else "",
                             rounds=rounds, **env))
    mem_head = "peak MiB" if dev.type == "cuda" else "saved-for-backward MiB"
    print(f"\n{model_name} training step (fwd + bwd + SGD), batch {batch} x {size}x{size}, "
          f"{args.amp or 'fp32'}, channels_last, on {env['device']} ({env['threads']} threads), {rounds} rounds")
    print(format_table(rows, ["provider", "median ms", "p20-p80", "vs eager", mem_head]))
    if compile_s is not None:
        print(f"torch.compile first step (compile included): {compile_s:.1f} s")
    print(f"first-step loss: eager {first_loss['eager']:.6f}, resnet_kernels {first_loss['resnet_kernels']:.6f} "
          f"(relative gap {loss_gap:.1e})")
    out = args.out or Path(__file__).resolve().parents[1] / "bench_out" / dev.type
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_train.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        w.writeheader()
        w.writerows(csv_rows)
    print(f"wrote {path}")
    tol = 1e-2 if amp is not None else 1e-4
    if loss_gap > tol:
        print(f"ERROR: converted model's first loss differs from eager by {loss_gap:.1e} (> {tol:g})")
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
