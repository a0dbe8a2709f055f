"""Packaging proof: what the wheels workflow does, done here on a copy of the tree.

- `pip wheel . --no-build-isolation --no-deps` (CUDA forced, archs 8.0;9.0a, local version on) gives
  a cp310-abi3 wheel named +cuXYZtorchA.B whose _C.abi3.so holds sm_80 and sm_90a cubins
  (scripts/check_wheel.py; cuobjdump from the triton package when the toolkit has none);
- that wheel, installed alone into a fresh venv, imports from outside the source tree and passes
  scripts/smoke_test.py; the smoke test itself refuses a package imported from a source tree;
- the sdist carries every C++/CUDA source and header, no binaries, and installs into a fresh venv
  with RESNET_KERNELS_BUILD_CUDA=0, passing the smoke test as a CPU-only build;
- the workflow files validate against their JSON schemas (check-jsonschema's vendored schemas,
  offline) and hold together: jobs, needs, local actions, scripts, the matrix plan.

The fresh venvs get torch & co. from this project's venv through a .pth file instead of a 5 GB
reinstall: a .pth line only appends that site-packages folder to sys.path (its own .pth files, such
as this checkout's editable-install hook, are not run), so the venv's own site-packages, holding only
the package under test, comes first. The smoke test checks where the package was imported from.
Cost on 2 cores: one CUDA build for two archs plus one CPU-only build (~3-4 minutes).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
WORKFLOWS = ROOT / ".github" / "workflows"
ARCHS = "8.0;9.0a"
# What a copy of the tree leaves out: build products, envs, caches (as a fresh clone would).
_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.o",
                                 ".pytest_cache", ".ruff_cache", "out", "bench_out", "*.whl")


class _Script:
    """scripts/<name>.py as a module, loaded on first use (the GPU workflow collects tests/ without
    scripts/ beside it)."""

    def __init__(self, name):
        self._name, self._mod = name, None

    def module(self):
        if self._mod is None:
            spec = importlib.util.spec_from_file_location(self._name, SCRIPTS / f"{self._name}.py")
            self._mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(self._mod)
        return self._mod

    def __getattr__(self, attr):
        return getattr(self.module(), attr)


check_wheel = _Script("check_wheel")
wheel_matrix = _Script("wheel_matrix")


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _env(**extra):
    env = dict(os.environ)
    # The project venv's console scripts (ninja, ...) for the build backends run in other venvs.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for k in ("PYTHONPATH", "TRITON_INTERPRET", "RESNET_KERNELS_LOCAL_VERSION", "RESNET_KERNELS_BUILD_CUDA",
              "RESNET_KERNELS_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST", "RESNET_KERNELS_PY_LIMITED_API"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(cmd, cwd, env, timeout):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{out[-6000:]}"
    return out


def _copy_tree(dst):
    shutil.copytree(ROOT, dst, ignore=_IGNORE)
    return dst


def _fresh_venv(path):
    """A venv with nothing installed that reaches this project's dependencies through a .pth file."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = sysconfig.get_path("purelib")  # this interpreter's site-packages: torch, triton, numpy, setuptools
    Path(purelib, "_resnet_kernels_test_deps.pth").write_text(deps + "\n")
    return py, Path(purelib)


def _pip_install(py, target, env, timeout, *extra):
    # --ignore-installed: the project venv's own (editable) resnet_kernels is visible through the
    # .pth file; pip must install beside it, never try to uninstall it.
    return _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                 "--disable-pip-version-check", *extra, target], cwd=target.parent, env=env, timeout=timeout)


def _smoke(py, cwd, *args):
    p = subprocess.run([str(py), str(SCRIPTS / "smoke_test.py"), *args], cwd=cwd, env=_env(),
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


# --- workflows ----------------------------------------------------------------------------------
def _yaml(path):
    from ruamel.yaml import YAML  # installed with check-jsonschema (requirements.txt)

    return YAML(typ="safe").load(path.read_text())


def test_workflows_validate_against_schemas():
    exe = Path(sys.executable).parent / "check-jsonschema"
    assert exe.exists(), "check-jsonschema is not installed in this venv: it is in requirements.txt (scripts/setup.sh)"
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"ci.yml", "wheels.yml"}
    _run([exe, "--builtin-schema", "vendor.github-workflows", *files], cwd=ROOT, env=_env(), timeout=120)
    actions = sorted((ROOT / ".github" / "actions").glob("*/action.yml"))
    assert actions, "no local composite actions found"
    _run([exe, "--builtin-schema", "vendor.github-actions", *actions], cwd=ROOT, env=_env(), timeout=120)


def test_schema_check_catches_a_broken_workflow(tmp_path):
    """The check above can fail: a job without runs-on and a step with both run and uses."""
    exe = Path(sys.executable).parent / "check-jsonschema"
    bad = tmp_path / "bad.yml"
    bad.write_text("name: x\non: push\njobs:\n  a:\n    steps:\n      - run: echo\n        uses: actions/checkout@v4\n")
    p = subprocess.run([exe, "--builtin-schema", "vendor.github-workflows", bad], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert p.returncode != 0, p.stdout


def _steps_text(job):
    return "\n".join(str(s.get("run", "")) + " " + str(s.get("uses", "")) for s in job.get("steps", []))


def test_workflows_hold_together():
    ci, wh = _yaml(WORKFLOWS / "ci.yml"), _yaml(WORKFLOWS / "wheels.yml")
    for wf in (ci, wh):
        jobs = wf["jobs"]
        for name, job in jobs.items():
            needs = job.get("needs", [])
            for n in [needs] if isinstance(needs, str) else needs:
                assert n in jobs, f"job {name} needs unknown job {n}"
            for step in job.get("steps", []):
                uses = step.get("uses", "")
                if uses.startswith("./"):
                    assert (ROOT / uses / "action.yml").exists(), f"{name}: local action {uses} missing"
                for script in re.findall(r"scripts/[\w.]+\.py", str(step.get("run", ""))):
                    assert (ROOT / script).exists(), f"{name}: {script} missing"
    assert ".ci/run" in _steps_text(ci["jobs"]["test"])
    assert "ruff check" in _steps_text(ci["jobs"]["lint"])

    jobs = wh["jobs"]
    # the matrix: Python x torch x CUDA, at least two of each after the explicit excludes
    cfg = json.loads(wh["env"]["WHEEL_MATRIX"])
    wheel_matrix.validate(cfg)
    assert cfg["exclude"] and all(e.get("why") for e in cfg["exclude"])
    plan = wheel_matrix.plan(cfg, wheel_matrix.combinations(cfg))
    assert len(plan["test"]["include"]) < len(cfg["python"]) * len(cfg["torch"]) * len(cfg["cuda"])
    assert cfg["archs"] == ARCHS
    for key in ("build", "test", "gpu"):
        assert jobs[key]["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.%s) }}" % key
    # builds: nvcc on a GPU-less hosted runner, CUDA forced, local version on
    build = jobs["build"]
    assert "self-hosted" not in str(build["runs-on"])
    assert build["env"]["RESNET_KERNELS_BUILD_CUDA"] == "1" and build["env"]["RESNET_KERNELS_LOCAL_VERSION"] == "1"
    assert "install-cuda" in _steps_text(build) and "pip wheel" in _steps_text(build)
    assert "check_wheel.py" in _steps_text(build)
    # the self-hosted GPU job: clearly labelled, runs the smoke test on the GPU and pytest -m gpu
    gpu = jobs["gpu"]
    assert {"self-hosted", "gpu"} <= set(gpu["runs-on"]) and "SELF-HOSTED GPU" in gpu["name"]
    text = _steps_text(gpu)
    assert "pytest -m gpu" in text and "smoke_test.py" in text and "--require-gpu" in text
    assert "uv venv" in text and "dist/*.whl" in text
    # the sdist installs with the CUDA build skipped
    assert jobs["sdist"]["env"]["RESNET_KERNELS_BUILD_CUDA"] == "0"
    assert "--expect-cpu-only" in _steps_text(jobs["sdist"])
    # publishing: tags only, after every test; PyPI through trusted publishing (an OIDC token)
    for name in ("pypi", "release"):
        assert "refs/tags/v" in jobs[name]["if"]
        assert set(jobs[name]["needs"]) == {"sdist", "build", "test", "gpu"}
    assert jobs["pypi"]["permissions"] == {"id-token": "write"}
    assert "pypa/gh-action-pypi-publish@release/v1" in _steps_text(jobs["pypi"])
    assert wh["on"]["push"]["tags"] == ["v*"]


def test_wheel_matrix_rejects_bad_configs():
    good = {"python": ["3.10", "3.12"], "torch": ["2.11.0", "2.14.1"], "cuda": ["12.8", "13.0"], "archs": ARCHS,
            "exclude": [{"python": "3.12", "cuda": "12.8", "why": "x"}]}
    wheel_matrix.validate(good)
    plan = wheel_matrix.plan(good, wheel_matrix.combinations(good))
    assert {(e["python"], e["torch"], e["cuda"]) for e in plan["test"]["include"]} == {
        ("3.10", "2.11.0", "12.8"), ("3.10", "2.11.0", "13.0"), ("3.10", "2.14.1", "12.8"),
        ("3.10", "2.14.1", "13.0"), ("3.12", "2.11.0", "13.0"), ("3.12", "2.14.1", "13.0")}
    assert [e["label"] for e in plan["build"]["include"]] == ["cu128torch2.11", "cu130torch2.11", "cu128torch2.14",
                                                               "cu130torch2.14"]
    assert all(e["python"] == "3.10" for e in plan["build"]["include"])
    for bad, msg in [({"exclude": [{"python": "3.9", "why": "x"}]}, "not on the python axis"),
                     ({"exclude": [{"cuda": "12.8"}]}, "must say why"),
                     ({"torch": ["2.14.1"]}, "at least two"),
                     ({"archs": "sm_80"}, "arch list")]:
        with pytest.raises(ValueError, match=msg):
            wheel_matrix.validate({**good, **bad})
    # excludes that leave one CUDA version are refused by the plan
    narrow = {**good, "exclude": [{"cuda": "12.8", "why": "x"}]}
    with pytest.raises(ValueError, match="cuda axis"):
        wheel_matrix.plan(narrow, wheel_matrix.combinations(narrow))


def test_wheel_matrix_probe_keeps_only_published_wheels(monkeypatch, capsys):
    """--probe reads one PyTorch index page per CUDA version (here: fake pages in that format)."""
    def row(name):
        return f'<a href="/whl/{name.split("%2B")[1][:5]}/{name}#sha256=00">{name.replace("%2B", "+")}</a><br/>'

    pages = {
        "https://download.pytorch.org/whl/cu128/torch/": "\n".join(row(n) for n in [
            "torch-2.11.0%2Bcu128-cp310-cp310-manylinux_2_28_x86_64.whl",
            "torch-2.11.0%2Bcu128-cp310-cp310-manylinux_2_28_aarch64.whl",   # wrong platform
            "torch-2.14.1%2Bcu128-cp312-cp312-win_amd64.whl",                # wrong platform
            "torch-2.14.10%2Bcu128-cp310-cp310-manylinux_2_28_x86_64.whl"]),  # another version
        "https://download.pytorch.org/whl/cu130/torch/": "\n".join(row(n) for n in [
            f"torch-{t}%2Bcu130-cp{p}-cp{p}-manylinux_2_28_x86_64.whl" for t in ("2.11.0", "2.14.1")
            for p in ("310", "312")]),
    }
    monkeypatch.setattr(wheel_matrix.module(), "_fetch", lambda url: pages[url])
    cfg = {"python": ["3.10", "3.12"], "torch": ["2.11.0", "2.14.1"], "cuda": ["12.8", "13.0"], "archs": ARCHS,
           "exclude": []}
    kept = {(c["python"], c["torch"], c["cuda"]) for c in wheel_matrix.published(wheel_matrix.combinations(cfg))}
    assert kept == {("3.10", "2.11.0", "12.8")} | {(p, t, "13.0") for p in ("3.10", "3.12")
                                                   for t in ("2.11.0", "2.14.1")}
    assert "torch 2.14.1+cu128 for Python 3.12 is not on" in capsys.readouterr().err


# --- setup.py switches (no compile: `setup.py --version` runs the same decisions) ---------------
@pytest.fixture(scope="module")
def setup_tree(tmp_path_factory):
    return _copy_tree(tmp_path_factory.mktemp("setup") / "src")


def _fake_toolkit(root, release):
    """A CUDA 'toolkit' whose nvcc only answers --version (enough for setup.py's checks)."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.99'\n")
    nvcc.chmod(0o755)
    return root


def _setup_version(tree, **env):
    p = subprocess.run([sys.executable, "setup.py", "--version"], cwd=tree, env=_env(**env), capture_output=True,
                       text=True, timeout=300)
    return p.returncode, p.stdout.strip().splitlines()[-1:], p.stdout + p.stderr


@pytest.mark.skipif(not torch.version.cuda, reason="torch is a CPU-only build: no CUDA version to compare with")
def test_setup_refuses_a_toolkit_of_another_cuda_major(setup_tree, tmp_path):
    major = int(torch.version.cuda.split(".")[0])
    other = f"{major - 1}.4"
    root = _fake_toolkit(tmp_path / "cuda", other)
    rc, _, out = _setup_version(setup_tree, CUDA_HOME=root, RESNET_KERNELS_BUILD_CUDA="1")
    assert rc != 0
    assert f"CUDA toolkit/torch mismatch: nvcc at {root / 'bin' / 'nvcc'}" in out
    assert f"is CUDA {other}, but the installed torch was built with CUDA {torch.version.cuda}" in out
    assert "RESNET_KERNELS_BUILD_CUDA=0" in out
    # a newer minor of the same major builds, with a warning; the local label names torch's CUDA
    newer = f"{major}.{int(torch.version.cuda.split('.')[1]) + 5}"
    root2 = _fake_toolkit(tmp_path / "cuda2", newer)
    rc, last, out = _setup_version(setup_tree, CUDA_HOME=root2, RESNET_KERNELS_BUILD_CUDA="1",
                                   RESNET_KERNELS_LOCAL_VERSION="1")
    assert rc == 0, out[-3000:]
    assert f"WARNING: CUDA toolkit {newer} is newer than torch's CUDA {torch.version.cuda}" in out
    assert last == [f"{_version()}+{wheel_matrix.label(torch.__version__.split('+')[0], torch.version.cuda)}"]


def test_setup_local_version_switch(setup_tree):
    ab = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    rc, last, out = _setup_version(setup_tree, RESNET_KERNELS_BUILD_CUDA="0", RESNET_KERNELS_LOCAL_VERSION="1")
    assert rc == 0 and last == [f"{_version()}+cputorch{ab}"], out[-3000:]
    rc, last, out = _setup_version(setup_tree, RESNET_KERNELS_BUILD_CUDA="0")
    assert rc == 0 and last == [_version()], out[-3000:]
    rc, last, out = _setup_version(setup_tree, RESNET_KERNELS_BUILD_CUDA="0", RESNET_KERNELS_LOCAL_VERSION="my.build7")
    assert rc == 0 and last == [f"{_version()}+my.build7"], out[-3000:]
    rc, _, out = _setup_version(setup_tree, RESNET_KERNELS_BUILD_CUDA="0", RESNET_KERNELS_LOCAL_VERSION="cu130-x")
    assert rc != 0 and "RESNET_KERNELS_LOCAL_VERSION='cu130-x' is not a PEP 440 local version label" in out


# --- the CUDA wheel -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_wheel(tmp_path_factory):
    if _nvcc() is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME): the CUDA wheel cannot be built here")
    if not torch.version.cuda:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build: no CUDA wheel to build against it")
    base = tmp_path_factory.mktemp("wheel")
    tree = _copy_tree(base / "src")
    # Two nvcc jobs of two threads each: the 2-core CI machine, ~3 GiB per job.
    env = _env(RESNET_KERNELS_BUILD_CUDA="1", RESNET_KERNELS_CUDA_ARCHS=ARCHS, RESNET_KERNELS_LOCAL_VERSION="1",
               MAX_JOBS="2", NVCC_THREADS="2")
    out = _run([sys.executable, "-m", "pip", "wheel", ".", "--no-build-isolation", "--no-deps", "--no-index",
                "-w", base / "dist"], cwd=tree, env=env, timeout=1200)
    wheels = list((base / "dist").glob("*.whl"))
    assert len(wheels) == 1, f"want one wheel, got {wheels}\n{out[-3000:]}"
    return wheels[0], tree


def test_cuda_wheel_name_contents_and_sass(cuda_wheel):
    whl, _ = cuda_wheel
    label = wheel_matrix.label(torch.__version__.split("+")[0], torch.version.cuda)  # what wheels.yml expects
    info = check_wheel.check(str(whl), label=label, archs=ARCHS, abi3=True, log=lambda *a: None)
    assert info["version"] == f"{_version()}+{label}"
    assert {"sm_80", "sm_90a"} <= set(info["sms"])


def _version():
    return re.search(r'__version__ = "(.*)"', (ROOT / "resnet_kernels" / "_version.py").read_text()).group(1)


def test_cuda_wheel_installs_alone_and_passes_the_smoke_test(cuda_wheel, tmp_path):
    whl, _ = cuda_wheel
    py, site = _fresh_venv(tmp_path / "venv")
    _pip_install(py, whl, _env(), 300)
    assert (site / "resnet_kernels" / "_C.abi3.so").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rc, out = _smoke(py, elsewhere, "--expect-cuda", "--archs", ARCHS)
    assert rc == 0, out[-6000:]
    assert f"imported from an installation: {site / 'resnet_kernels'}" in out
    assert "backend=torch on cpu" in out and "all checks passed" in out


def test_smoke_test_refuses_a_source_tree(cuda_wheel, tmp_path):
    """Run with the copied source tree first on sys.path (its package has no built _C): the smoke
    test must fail, naming the source tree, even though an installed copy exists further down."""
    whl, tree = cuda_wheel
    py, _ = _fresh_venv(tmp_path / "venv")
    _pip_install(py, whl, _env(), 300)
    p = subprocess.run([str(py), str(SCRIPTS / "smoke_test.py"), "--expect-cuda"], cwd=tmp_path,
                       env={**_env(), "PYTHONPATH": str(tree)}, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert f"imported from the source tree {tree}" in out


# --- the sdist ----------------------------------------------------------------------------------
def test_sdist_has_the_sources_and_installs_without_cuda(tmp_path):
    tree = _copy_tree(tmp_path / "src")
    # A stray in-place build product must not ship.
    (tree / "resnet_kernels" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF stale")
    env = _env(RESNET_KERNELS_BUILD_CUDA="0", MAX_JOBS="2")
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", tmp_path / "dist", "."],
         cwd=tree, env=env, timeout=300)
    (sdist,) = list((tmp_path / "dist").glob("resnet_kernels-*.tar.gz"))
    assert sdist.name == f"resnet_kernels-{_version()}.tar.gz", "an sdist never carries a local version"
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()
               and p.suffix in (".cpp", ".cu", ".cuh", ".h")}
    assert sources and sources <= names, f"sdist lacks {sorted(sources - names)}"
    for need in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "requirements.txt", "scripts/smoke_test.py",
                 "resnet_kernels/__init__.py", "resnet_kernels/triton/conv_bn_act.py"):
        assert need in names, f"sdist lacks {need}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))], "binaries in the sdist"

    py, site = _fresh_venv(tmp_path / "venv")
    out = _pip_install(py, sdist, env, 600, "--no-build-isolation", "-v")
    assert "building the CPU-only extension (RESNET_KERNELS_BUILD_CUDA=0)" in out
    sos = sorted(p.name for p in (site / "resnet_kernels").glob("_C*.so"))
    assert sos == ["_C.abi3.so"], sos
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rc, smoke = _smoke(py, elsewhere, "--expect-cpu-only")
    assert rc == 0, smoke[-6000:]
    assert f"imported from an installation: {site / 'resnet_kernels'}" in smoke
