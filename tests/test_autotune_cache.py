"""auto's measured choice and its disk cache (resnet_kernels/_autotune.py, backends._auto).

On CPU the real `auto` has no candidate besides torch, so these tests open the door with fake GPU
candidates named "cuda" and "triton" that run the torch backend (optionally made wrong), and inject
their timings. The rule under test throughout: a candidate is timed, stored or taken only after it
agreed with the torch backend on the call's own inputs in this process.
"""
import json
import multiprocessing as mp
import os
import sys
import time
import warnings

import pytest
import torch

import resnet_kernels as rk
from resnet_kernels import _autotune, backends


def _case(seed=0, residual=True, dtype=torch.float32, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 7, 7, generator=g).to(dtype)
    w = (torch.randn(8, 8, 3, 3, generator=g) * 0.2).to(dtype)
    s = torch.rand(8, generator=g) + 0.5
    b = torch.randn(8, generator=g)
    r = torch.randn(2, 8, 7, 7, generator=g).to(dtype) if residual else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        r = None if r is None else r.contiguous(memory_format=torch.channels_last)
    return x, w, (s, b, r, (1, 1), (1, 1), (1, 1), 1, True)


class Fakes:
    """Fake candidates 'cuda' and 'triton' (the torch backend underneath; `wrong` ones add 0.5),
    injected timings in ms, and a log of what was measured."""

    def __init__(self, monkeypatch, tmp_path):
        self.mp = monkeypatch
        self.wrong = set()
        self.ms = {"cuda": 3.0, "triton": 1.0, "torch": 2.0}
        self.measured = []
        self.dir = tmp_path / "cache"
        real_run, real_supports = backends.run, backends.supports

        def run(name, x, *a):
            if name in ("cuda", "triton"):
                y = real_run("torch", x, *a)
                return y + 0.5 if name in self.wrong else y
            return real_run(name, x, *a)

        def supports(name, x, weight, groups):
            return (True, "") if name in ("cuda", "triton") else real_supports(name, x, weight, groups)

        def measure(names, x, weight, call):
            self.measured.append(list(names))
            return {n: self.ms[n] * 1e-3 for n in names}

        monkeypatch.setattr(backends, "run", run)
        monkeypatch.setattr(backends, "supports", supports)
        monkeypatch.setattr(backends, "_candidates", lambda x: ("cuda", "triton"))
        monkeypatch.setattr(backends, "_measure", measure)
        monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", str(self.dir))
        monkeypatch.delenv("RESNET_KERNELS_BACKEND", raising=False)
        monkeypatch.delenv("RESNET_KERNELS_AUTOTUNE", raising=False)
        self.new_process()

    def new_process(self):
        """Forget everything a process remembers (verdicts, choices, file contents in memory)."""
        self.mp.setattr(backends, "_VERDICTS", {})
        self.mp.setattr(backends, "_CHOICES", {})
        _autotune.forget()
        self.measured.clear()

    def file(self):
        [path] = self.dir.glob("autotune-*.json")
        return json.loads(path.read_text())

    def checked(self):
        return sorted(k[0] for k in backends.verdicts())


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    f = Fakes(monkeypatch, tmp_path)
    yield f
    _autotune.forget()


def test_fastest_checked_candidate_is_taken_stored_and_remembered(fakes):
    x, w, call = _case()
    assert backends.resolve("auto", x, w, 1, call=call) == "triton"
    assert fakes.measured == [["cuda", "triton", "torch"]]
    assert fakes.checked() == ["cuda", "triton"]  # both checked against torch before any timing
    data = fakes.file()
    assert data["format"] == _autotune.FORMAT
    assert data["header"]["library"] == _autotune.library_fingerprint()
    assert data["header"]["torch"] == torch.__version__
    [(key, entry)] = data["choices"].items()
    assert key == backends.choice_key(x, w, call)
    assert entry["backend"] == "triton" and entry["ms"] == {"cuda": 3.0, "triton": 1.0, "torch": 2.0}
    # Same signature again, and through the public op: no second check, no second timing.
    y = rk.fused_conv_bn_act(x, w, *call[:3], padding=1)
    assert fakes.measured == [["cuda", "triton", "torch"]] and len(backends.verdicts()) == 2
    torch.testing.assert_close(y, rk.fused_conv_bn_act(x, w, *call[:3], padding=1, backend="torch"))


def test_a_later_process_reuses_the_stored_choice_but_checks_it_first(fakes):
    x, w, call = _case()
    backends.resolve("auto", x, w, 1, call=call)
    fakes.new_process()
    fakes.ms = {"cuda": 0.1, "triton": 9.0, "torch": 9.0}  # would change the choice if it were re-timed
    assert backends.resolve("auto", x, w, 1, call=call) == "triton"
    assert fakes.measured == []  # taken from disk ...
    assert fakes.checked() == ["triton"]  # ... after its own correctness check in this process


def test_a_stored_candidate_that_fails_its_check_is_never_taken(fakes):
    x, w, call = _case()
    backends.resolve("auto", x, w, 1, call=call)  # stores triton
    fakes.new_process()
    fakes.wrong = {"triton"}  # e.g. another driver, or a kernel bug on this GPU
    with pytest.warns(RuntimeWarning, match="'triton' disagrees with the torch backend"):
        assert backends.resolve("auto", x, w, 1, call=call) == "torch"  # torch 2 ms < cuda 3 ms
    assert fakes.measured == [["cuda", "torch"]]
    assert fakes.file()["choices"][backends.choice_key(x, w, call)]["backend"] == "torch"


def test_a_wrong_candidate_is_neither_timed_nor_taken_however_fast(fakes):
    fakes.wrong = {"triton"}
    fakes.ms = {"cuda": 1.5, "triton": 0.01, "torch": 2.0}
    x, w, call = _case()
    with pytest.warns(RuntimeWarning, match="disagrees"):
        assert backends.resolve("auto", x, w, 1, call=call) == "cuda"
    assert fakes.measured == [["cuda", "torch"]]


def test_when_every_candidate_is_wrong_torch_serves_and_nothing_is_stored(fakes):
    fakes.wrong = {"cuda", "triton"}
    x, w, call = _case()
    with pytest.warns(RuntimeWarning):
        assert backends.resolve("auto", x, w, 1, call=call) == "torch"
    assert fakes.measured == [] and not list(fakes.dir.glob("autotune-*.json"))


def test_torch_can_win_and_a_stored_torch_needs_no_check(fakes):
    fakes.ms = {"cuda": 3.0, "triton": 2.5, "torch": 1.0}
    x, w, call = _case()
    assert backends.resolve("auto", x, w, 1, call=call) == "torch"
    fakes.new_process()
    assert backends.resolve("auto", x, w, 1, call=call) == "torch"
    assert fakes.measured == [] and fakes.checked() == []


def test_each_signature_gets_its_own_choice(fakes):
    x, w, call = _case()
    xc, wc, callc = _case(channels_last=True)
    xh, wh, callh = _case(dtype=torch.float16)
    x0, w0, call0 = _case(residual=False)
    keys = {backends.choice_key(*c) for c in ((x, w, call), (xc, wc, callc), (xh, wh, callh), (x0, w0, call0))}
    assert len(keys) == 4
    backends.resolve("auto", x, w, 1, call=call)
    fakes.ms = {"cuda": 0.5, "triton": 1.0, "torch": 2.0}
    assert backends.resolve("auto", xc, wc, 1, call=callc) == "cuda"
    assert backends.resolve("auto", x, w, 1, call=call) == "triton"  # the first choice stands
    assert {e["backend"] for e in fakes.file()["choices"].values()} == {"triton", "cuda"}


@pytest.mark.parametrize("change", ["library", "device", "torch"])
def test_a_new_library_device_or_torch_invalidates_the_stored_choices(fakes, monkeypatch, change):
    x, w, call = _case()
    backends.resolve("auto", x, w, 1, call=call)  # triton stored
    fakes.new_process()
    if change == "library":
        monkeypatch.setattr(_autotune, "library_fingerprint", lambda: "0.1.0+rebuilt")
    elif change == "device":
        real = _autotune.header_for
        monkeypatch.setattr(_autotune, "header_for", lambda dev: {**real(dev), "device": "another CPU"})
    else:
        real = _autotune.header_for
        monkeypatch.setattr(_autotune, "header_for", lambda dev: {**real(dev), "torch": "9.9.9"})
    fakes.ms = {"cuda": 0.5, "triton": 1.0, "torch": 2.0}
    assert backends.resolve("auto", x, w, 1, call=call) == "cuda"  # measured again, not read
    assert fakes.measured == [["cuda", "triton", "torch"]]
    data = fakes.file()  # the file now belongs to the new header, without the old entries' header
    assert data["header"] == _autotune.header_for(_autotune.device_id(x.device))
    assert [e["backend"] for e in data["choices"].values()] == ["cuda"]


def test_the_device_is_part_of_the_file_name(fakes, monkeypatch):
    x, w, call = _case()
    backends.resolve("auto", x, w, 1, call=call)
    fakes.new_process()
    monkeypatch.setattr(_autotune, "device_id", lambda dev: "NVIDIA H200 sm_90")
    backends.resolve("auto", x, w, 1, call=call)
    names = sorted(p.name for p in fakes.dir.glob("autotune-*.json"))
    assert len(names) == 2 and "autotune-NVIDIA_H200_sm_90.json" in names


def test_a_corrupt_or_foreign_file_is_ignored_and_replaced(fakes):
    x, w, call = _case()
    fakes.dir.mkdir(parents=True)
    path = _autotune.cache_for(x.device).path
    for garbage in ('{"format": 1, "header": {"library": "x"}, "choices": {"k": {"backend": "cuda"}}}',
                    "{ not json", json.dumps({"format": 1, "header": _autotune.cache_for(x.device).header,
                                              "choices": ["not", "a", "dict"]})):
        fakes.new_process()
        path.write_text(garbage)
        assert backends.resolve("auto", x, w, 1, call=call) == "triton"
        assert fakes.measured == [["cuda", "triton", "torch"]]
        assert json.loads(path.read_text())["choices"][backends.choice_key(x, w, call)]["backend"] == "triton"


def test_an_unknown_backend_on_disk_is_ignored(fakes):
    x, w, call = _case()
    cache = _autotune.cache_for(x.device)
    cache.put(backends.choice_key(x, w, call), {"backend": "rocm"})
    fakes.new_process()
    assert backends.resolve("auto", x, w, 1, call=call) == "triton"
    assert fakes.measured == [["cuda", "triton", "torch"]]


def test_an_unwritable_cache_folder_keeps_choices_in_memory(fakes, monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", str(blocker / "sub"))  # mkdir fails: parent is a file
    x, w, call = _case()
    with pytest.warns(RuntimeWarning, match="cannot write auto's choice cache"):
        assert backends.resolve("auto", x, w, 1, call=call) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file, then quiet
        x2, w2, call2 = _case(residual=False)
        assert backends.resolve("auto", x2, w2, 1, call=call2) == "triton"


def test_cache_off_and_autotune_off(fakes, monkeypatch):
    monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", "off")
    x, w, call = _case()
    assert backends.resolve("auto", x, w, 1, call=call) == "triton"
    assert fakes.measured and not fakes.dir.exists()
    fakes.new_process()
    monkeypatch.setenv("RESNET_KERNELS_AUTOTUNE", "0")  # first checked candidate in preference order
    assert backends.resolve("auto", x, w, 1, call=call) == "cuda"
    assert fakes.measured == []
    fakes.wrong = {"cuda"}
    fakes.new_process()
    with pytest.warns(RuntimeWarning, match="'cuda' disagrees"):
        assert backends.resolve("auto", x, w, 1, call=call) == "triton"


def test_while_tracing_only_what_eager_settled_is_used(fakes, monkeypatch):
    x, w, call = _case()
    monkeypatch.setattr(backends, "_cannot_check", lambda: True)
    assert backends.resolve("auto", x, w, 1, call=call) == "torch"  # nothing checked yet, no disk read
    assert fakes.measured == [] and backends.verdicts() == {}
    monkeypatch.setattr(backends, "_cannot_check", lambda: False)
    assert backends.resolve("auto", x, w, 1, call=call) == "triton"
    monkeypatch.setattr(backends, "_cannot_check", lambda: True)
    assert backends.resolve("auto", x, w, 1, call=call) == "triton"


def test_the_override_and_the_cpu_default_touch_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(backends, "_measure", lambda *a: pytest.fail("measured on a CPU call"))
    _autotune.forget()
    x, w, call = _case()
    assert backends.resolve("auto", x, w, 1, call=call) == "torch"  # CPU: no candidate besides torch
    monkeypatch.setenv("RESNET_KERNELS_BACKEND", "torch")
    assert backends.resolve("auto", x, w, 1, call=call) == "torch"
    assert list(tmp_path.iterdir()) == []


def test_real_measurement_ranks_a_slower_candidate_last(monkeypatch):
    """backends._measure itself (no injected timings): a candidate that does the same work plus a
    20 ms sleep is measured slower than torch; one that raises gets inf."""
    real_run = backends.run

    def run(name, *a):
        if name == "slow":
            time.sleep(20e-3)
            return real_run("torch", *a)
        if name == "broken":
            raise RuntimeError("launch failed")
        return real_run(name, *a)

    monkeypatch.setattr(backends, "run", run)
    x, w, call = _case()
    t = backends._measure(["slow", "torch", "broken"], x, w, call, rounds=3)
    assert t["broken"] == float("inf")
    assert t["slow"] >= 20e-3 and 0 < t["torch"] < t["slow"]


# --- concurrent processes -------------------------------------------------------------------------------
_HEADER = {"library": "test", "torch": "t", "triton": "t", "device": "d"}


def _writer(path, wid, n, barrier):
    cache = _autotune.ChoiceCache(path, _HEADER)
    barrier.wait()
    for i in range(n):
        cache.put(f"writer{wid}-key{i}", {"backend": "triton", "i": i})


def _reader(path, stop, bad):
    while not stop.is_set():
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("header") != _HEADER:
                bad.value += 1
        except FileNotFoundError:
            pass
        except ValueError:  # a torn (partially written) file
            bad.value += 1


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method and flock: Linux")
def test_concurrent_writers_lose_nothing_and_readers_never_see_a_torn_file(tmp_path):
    ctx = mp.get_context("fork")
    path = tmp_path / "autotune-shared.json"
    n_writers, n_keys = 4, 25
    barrier, stop, bad = ctx.Barrier(n_writers), ctx.Event(), ctx.Value("i", 0)
    reader = ctx.Process(target=_reader, args=(path, stop, bad))
    reader.start()
    writers = [ctx.Process(target=_writer, args=(path, i, n_keys, barrier)) for i in range(n_writers)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(60)
    stop.set()
    reader.join(10)
    assert all(p.exitcode == 0 for p in writers) and reader.exitcode == 0
    data = json.loads(path.read_text())
    want = {f"writer{i}-key{k}" for i in range(n_writers) for k in range(n_keys)}
    assert set(data["choices"]) == want  # no read-merge-write lost another process's entry
    assert bad.value == 0
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # no temporary file left behind
    # A fresh reader of that file (same header) sees every entry.
    assert len(_autotune.ChoiceCache(path, _HEADER).entries()) == n_writers * n_keys


def test_cache_dir_rules(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", str(tmp_path / "rk"))
    assert _autotune.cache_dir() == tmp_path / "rk"
    for off in ("", "off", "0"):
        monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", off)
        assert _autotune.cache_dir() is None
    monkeypatch.delenv("RESNET_KERNELS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _autotune.cache_dir() == tmp_path / "xdg" / "resnet_kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(_autotune.cache_dir()) == os.path.join(os.path.expanduser("~"), ".cache", "resnet_kernels")


@pytest.mark.skipif("triton" not in rk.available_backends(), reason="Triton (interpreter) is not available here")
def test_real_race_with_the_triton_interpreter(monkeypatch, tmp_path):
    """End to end without fakes: Triton (the interpreter standing in for a GPU candidate) is checked,
    timed against torch on the call's own inputs, and the faster of the two is taken and stored with
    both timings (on this machine torch, by about 30x; the assertion follows the recorded timings so
    that a burst of load on a shared machine cannot fail it)."""
    monkeypatch.setattr(backends, "_candidates", lambda x: ("triton",))
    monkeypatch.setattr(backends, "_VERDICTS", {})
    monkeypatch.setattr(backends, "_CHOICES", {})
    monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RESNET_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("RESNET_KERNELS_AUTOTUNE", raising=False)
    _autotune.forget()
    x, w, call = _case()
    got = backends.resolve("auto", x, w, 1, call=call)
    assert list(backends.verdicts().values()) == [True]  # triton was checked (and agreed) before the race
    [entry] = json.loads(next(tmp_path.glob("autotune-*.json")).read_text())["choices"].values()
    ms = entry["ms"]
    assert set(ms) == {"triton", "torch"} and all(v is not None and v > 0 for v in ms.values()), entry
    assert got == entry["backend"] == min(ms, key=ms.get), entry
    _autotune.forget()
