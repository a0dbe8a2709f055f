"""Helpers shared by the benchmark scripts: real-photo inputs, timing statistics, environment facts.

Nothing here imports resnet_kernels, so plot.py (and any CSV consumer) stays independent of it.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for pretrained weights

REPO_ROOT = Path(__file__).resolve().parent.parent

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# scikit-image sample photos that ship with the package (no download). RGB first; grayscale ones are
# stacked to three channels. Synthetic or binary images (checkerboard, horse, ...) are left out.
RGB_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry", "hubble_deep_field",
              "retina", "stereo_motorcycle", "colorwheel", "logo")
GRAY_PHOTOS = ("camera", "moon", "coins", "clock", "grass", "gravel", "brick", "cell", "page", "text")


# --------------------------------------------------------------------------------------- photos
def load_photos():
    """[(name, float32 tensor [3, H, W] in [0, 1])] for every sample photo that loads offline."""
    import numpy as np
    import skimage.data
    import torch

    photos = []
    for name in RGB_PHOTOS + GRAY_PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a photo that needs a download (or is missing) is skipped
            continue
        if isinstance(img, tuple):  # stereo_motorcycle returns (left, right, disparity)
            img = img[0]
        img = np.asarray(img)
        if img.dtype != np.uint8:
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        elif img.shape[-1] == 4:  # RGBA (logo): composite over white
            alpha = img[..., 3:4].astype(np.float32) / 255.0
            img = (img[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        if img.ndim != 3 or img.shape[-1] != 3 or min(img.shape[:2]) < 64:
            continue
        photos.append((name, torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)))
    if not photos:
        raise RuntimeError("no scikit-image sample photo could be loaded")
    return photos


def random_resized_crop(img, size, gen, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), flip=True):
    """torchvision-style RandomResizedCrop (+ horizontal flip) of a [3, H, W] tensor, driven by `gen`."""
    import math

    import torch
    import torch.nn.functional as F

    _, h, w = img.shape
    area = h * w
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=gen).item())
        log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand((), generator=gen).item()
        aspect = math.exp(log_r)
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            break
    else:  # fall back to a centre crop of the whole short side
        ch = cw = min(h, w)
        top, left = (h - ch) // 2, (w - cw) // 2
    crop = img[:, top:top + ch, left:left + cw].unsqueeze(0)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if flip and torch.rand((), generator=gen).item() < 0.5:
        out = out.flip(-1)
    return out.clamp_(0.0, 1.0)


def normalize(batch):
    import torch

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


def photo_batch(photos, n, size, seed):
    """n ImageNet-normalised random-resized crops, cycling through the photos: float32 [n, 3, size, size],
    NCHW contiguous. Deterministic in `seed`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(photos), generator=gen).tolist()
    imgs = [random_resized_crop(photos[order[i % len(order)]][1], size, gen) for i in range(n)]
    return normalize(torch.stack(imgs)).contiguous()


# --------------------------------------------------------------------------------------- statistics
def percentile(values, q):
    """Linear-interpolated percentile (numpy's default method) of a non-empty sequence, q in [0, 100]."""
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def last_level_cache_bytes(default=32 << 20):
    """Size of this CPU's largest cache (Linux sysfs), or `default` when it cannot be read."""
    best = 0
    for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            text = (idx / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best or default


def time_rotating(fns, inputs, *, warmup_rounds=2, min_rounds=10, max_rounds=200, min_seconds=0.5,
                  sync=None, on_round=None):
    """Interleaved CPU-side timing of several providers that take the same inputs.

    fns: {provider: fn(*args)}; inputs: a list of argument tuples. Every call takes the next tuple
    of the list, so with enough tuples (together larger than the last-level cache) no call finds its
    inputs in cache from its own previous call, as in a network, where the other layers run in
    between. Each round calls every provider once, in an order rotated from round to round, so
    slow drifts of a shared machine hit all providers alike. Rounds continue until at least
    min_rounds timed rounds and min_seconds of timed calls, or max_rounds. The garbage collector
    is paused. sync: called before and after each timed call (torch.cuda.synchronize on CUDA).

    Returns ({provider: [seconds per call]}, {provider: CPU share}): the CPU share is the process's
    CPU time during that provider's calls / (wall time x torch threads), near 1 on an idle machine.
    """
    import gc
    import time

    import torch

    names = list(fns)
    samples = {n: [] for n in names}
    cpu = {n: 0.0 for n in names}
    nxt = {n: 0 for n in names}
    threads = max(torch.get_num_threads(), 1)
    sync = sync or (lambda: None)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        r = 0
        spent = 0.0
        while True:
            timed = r >= warmup_rounds
            if timed and (r - warmup_rounds >= max_rounds or
                          (r - warmup_rounds >= min_rounds and spent >= min_seconds)):
                break
            k = r % len(names)
            for name in names[k:] + names[:k]:
                args = inputs[nxt[name] % len(inputs)]
                nxt[name] += 1
                sync()
                c0, t0 = time.process_time(), time.perf_counter()
                fns[name](*args)
                sync()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if timed:
                    samples[name].append(dt)
                    cpu[name] += dc
                    spent += dt
            r += 1
            if on_round is not None:
                on_round(r)
    finally:
        if was_enabled:
            gc.enable()
    return samples, {n: cpu[n] / (sum(samples[n]) * threads) if samples[n] else None for n in names}


# --------------------------------------------------------------------------------------- environment
def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def package_version(name):
    try:
        mod = __import__(name)
    except Exception:  # noqa: BLE001 - triton may be missing or broken on this machine
        return "none"
    return str(getattr(mod, "__version__", "unknown"))


def timestamp():
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------- printing
def format_table(rows, headers, aligns=None):
    """Plain-text table; aligns: per column '<' or '>' (default: right for numbers-looking cells)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    aligns = aligns or ["<"] + [">"] * (len(headers) - 1)
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, aligns, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
