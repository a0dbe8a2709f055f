"""auto's measured backend choices, kept on disk per device and shared by processes.

One JSON file per device under the cache folder:

    $RESNET_KERNELS_CACHE_DIR            (set to "" or "off" to keep choices in memory only)
    else $XDG_CACHE_HOME/resnet_kernels
    else ~/.cache/resnet_kernels

    autotune-<device slug>.json = {"format": 1,
                                   "header": {"library": <fingerprint>, "torch": ..., "triton": ..., "device": ...},
                                   "choices": {<call signature>: {"backend": "triton", "ms": {...}, "when": ...}}}

A file whose header differs from this process's (another resnet_kernels version or build, another
torch/triton, another device) is treated as empty, and the next write replaces it. The library
fingerprint covers the package version and the backend implementations (source files' contents,
the compiled extension's size and mtime), so an edited or rebuilt kernel is measured again.

Concurrency: readers only ever see a complete file (every write goes to a temporary file in the
same folder and is moved into place with os.replace, which is atomic on POSIX and Windows). Writers
serialise their read-merge-write through an exclusive lock on `<file>.lock` (fcntl.flock, released
by the kernel if a process dies), so entries written by concurrent processes are never lost. Where
flock is missing (Windows) a concurrent writer can drop another's entry, never corrupt the file;
the dropped choice is simply measured again.

A stored choice is a performance hint only: backends.resolve still checks a GPU candidate against
the torch backend in each process before taking it.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path

FORMAT = 1
_DISABLED = ("", "0", "off", "none")


def cache_dir():
    """The folder for the choice files, or None when disk caching is switched off."""
    env = os.environ.get("RESNET_KERNELS_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in _DISABLED else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "resnet_kernels"


_fingerprint = None


def library_fingerprint():
    """Version + a digest of the backend implementations of this install (computed once)."""
    global _fingerprint
    if _fingerprint is None:
        from ._version import __version__

        root = Path(__file__).resolve().parent
        h = hashlib.sha1(__version__.encode())
        for path in sorted(list(root.glob("*.py")) + list(root.glob("triton/*.py"))):
            h.update(path.name.encode())
            try:
                h.update(path.read_bytes())
            except OSError:
                pass
        for path in sorted(root.glob("_C*")):  # the compiled extension (tens of MB: size + mtime, not content)
            try:
                st = path.stat()
                h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                pass
        _fingerprint = f"{__version__}+{h.hexdigest()[:16]}"
    return _fingerprint


def device_id(device):
    """What identifies the hardware a choice was measured on (name and compute capability)."""
    import torch

    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        return f"{torch.cuda.get_device_name(idx)} sm_{major}{minor}"
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{device.type}: {name}"


def header_for(device_id_):
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - missing or broken Triton
        triton_version = "none"
    return {"library": library_fingerprint(), "torch": torch.__version__, "triton": triton_version,
            "device": device_id_}


def _slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:80] or "device"


class ChoiceCache:
    """The choice file of one device: get() reads (once, lazily), put() merges one entry in."""

    def __init__(self, path, header):
        self.path = Path(path)
        self.header = dict(header)
        self._entries = None
        self._lock = threading.Lock()
        self._warned = False

    # -- reading ----------------------------------------------------------------------------------
    def _read_file(self):
        """The entries of the file on disk when its format and header match ours, else {}."""
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}  # missing, unreadable or corrupt: as if empty (the next write replaces it)
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("header") != self.header:
            return {}
        choices = data.get("choices")
        return {k: v for k, v in choices.items() if isinstance(v, dict)} if isinstance(choices, dict) else {}

    def entries(self):
        with self._lock:
            if self._entries is None:
                self._entries = self._read_file()
            return dict(self._entries)

    def get(self, key):
        return self.entries().get(key)

    def reload(self):
        with self._lock:
            self._entries = None

    # -- writing ----------------------------------------------------------------------------------
    def put(self, key, value):
        """Merge {key: value} into the file (under the lock file) and into memory. Returns True
        when it reached the disk; a folder that cannot be written keeps it in memory only."""
        with self._lock:
            if self._entries is None:
                self._entries = self._read_file()
            self._entries[key] = value
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with _FileLock(self.path.with_name(self.path.name + ".lock")):
                    merged = self._read_file()  # entries other processes wrote since we read
                    merged[key] = value
                    self._write(merged)
                    self._entries = {**merged, **self._entries}
                return True
            except OSError as e:
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"resnet_kernels: cannot write auto's choice cache {self.path} ({e}); choices "
                                  "stay in memory for this process (set RESNET_KERNELS_CACHE_DIR to a writable "
                                  "folder, or to 'off')", RuntimeWarning, stacklevel=3)
                return False

    def _write(self, entries):
        data = {"format": FORMAT, "header": self.header, "choices": entries}
        fd, tmp = tempfile.mkstemp(prefix="." + self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


class _FileLock:
    """An exclusive advisory lock on a file (fcntl.flock; a no-op where flock does not exist)."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: atomic replace still keeps the file whole
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


_caches = {}
_caches_lock = threading.Lock()


def cache_for(device):
    """The ChoiceCache of `device` (one per device id and cache folder), or None when switched off."""
    folder = cache_dir()
    if folder is None:
        return None
    dev = device_id(device)
    key = (str(folder), dev)
    with _caches_lock:
        cache = _caches.get(key)
        if cache is None:
            cache = _caches[key] = ChoiceCache(folder / f"autotune-{_slug(dev)}.json", header_for(dev))
        return cache


def forget():
    """Drop the in-memory copies (the files stay): the next lookup reads the disk again."""
    with _caches_lock:
        _caches.clear()


def now():
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
