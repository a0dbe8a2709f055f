#!/usr/bin/env python
"""Check a built resnet_kernels wheel: its name, tags, contents and the GPU code in its extension.

    python scripts/check_wheel.py dist/resnet_kernels-*.whl [--label cu130torch2.14] [--archs "8.0;9.0a"]
                                  [--no-abi3]

- the file name carries the local version label (--label) and, unless --no-abi3, the cp310-abi3 tags;
- the wheel holds the Python package and exactly one compiled resnet_kernels/_C module (_C.abi3.so
  for an abi3 wheel), and no sources, tests or object files;
- its metadata pins torch to the minor release it was built against (a local-label wheel);
- the module does not link libtorch_python (the stable-ABI promise: only libtorch and CPython's
  stable ABI);
- with --archs: `cuobjdump --list-elf` finds a cubin for every arch (8.0 -> sm_80, 9.0a -> sm_90a).
  cuobjdump comes from PATH / CUDA_HOME, else from the one the triton package ships.
Prints what it checked; exits non-zero on the first failure.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile


def find_cuobjdump():
    cand = [shutil.which("cuobjdump")]
    if os.environ.get("CUDA_HOME"):
        cand.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    try:
        import triton

        cand.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in cand:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def arch_to_sm(arch):
    """"8.0" -> "sm_80", "9.0a" -> "sm_90a" (a "+PTX" suffix adds PTX, not a cubin)."""
    m = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", arch.strip())
    if not m:
        raise ValueError(f"arch {arch!r} is not like '8.0' or '9.0a'")
    return f"sm_{m.group(1)}{m.group(2)}{m.group(3)}"


def elf_archs(cuobjdump, so):
    out = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{cuobjdump} --list-elf {so} failed: {out.stderr.strip()}")
    return sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", out.stdout)))


def check(whl, label=None, archs=None, abi3=True, log=print):
    """Raise AssertionError naming the first rule the wheel breaks; return the extracted .so info."""
    name = os.path.basename(whl)
    m = re.fullmatch(r"resnet_kernels-(?P<ver>[^-]+)-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl", name)
    assert m, f"{name}: not a resnet_kernels wheel file name"
    ver = m.group("ver")
    if label:
        assert ver.endswith("+" + label), f"{name}: version {ver} lacks the local label +{label}"
        log(f"ok: version {ver} carries +{label}")
    if abi3:
        tags = (m.group("py"), m.group("abi"))
        assert tags == ("cp310", "abi3"), f"{name}: tags {'-'.join(tags)}, want cp310-abi3"
        log("ok: cp310-abi3 (one wheel for every CPython >= 3.10)")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        sos = [n for n in names if re.fullmatch(r"resnet_kernels/_C[^/]*\.so", n)]
        assert len(sos) == 1, f"{name}: want exactly one resnet_kernels/_C*.so, got {sos}"
        if abi3:
            assert sos[0] == "resnet_kernels/_C.abi3.so", f"{name}: {sos[0]} is not the abi3 module _C.abi3.so"
        for need in ("resnet_kernels/__init__.py", "resnet_kernels/ops.py", "resnet_kernels/triton/conv_bn_act.py"):
            assert need in names, f"{name}: lacks {need}"
        bad = [n for n in names
               if n.startswith(("csrc/", "tests/", "benchmarks/")) or n.endswith((".o", ".cu", ".cpp"))]
        assert not bad, f"{name}: ships sources/tests/objects {bad[:5]}"
        log(f"ok: contents ({len(names)} files, extension {sos[0]})")
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode()
        requires = re.findall(r"^Requires-Dist: (torch\b.*)$", meta, flags=re.M)
        if label:
            mm = re.search(r"torch(\d+)\.(\d+)$", label)
            assert mm, f"label {label} does not end in torchA.B"
            a, b = int(mm.group(1)), int(mm.group(2))
            want = {f">={a}.{b}", f"<{a}.{b + 1}"}
            got = set(re.sub(r"^torch\s*", "", requires[0]).replace(" ", "").split(",")) if requires else set()
            assert got == want, f"{name}: Requires-Dist {requires}, want torch pinned to {a}.{b} ({sorted(want)})"
            log(f"ok: Requires-Dist {requires[0]}")
        tmp = tempfile.mkdtemp(prefix="check_wheel_")
        so = z.extract(sos[0], tmp)
    readelf = shutil.which("readelf")
    if readelf:
        needed = re.findall(r"\(NEEDED\).*\[(.*)\]", subprocess.run([readelf, "-d", so], capture_output=True,
                                                                      text=True).stdout)
        assert not any(n.startswith("libtorch_python") for n in needed), f"{sos[0]} links libtorch_python: {needed}"
        log(f"ok: links {', '.join(needed)}")
    else:
        log("note: readelf not found; linked libraries not checked")
    found = None
    if archs:
        want = [arch_to_sm(a) for a in archs.split(";") if a.strip()]
        tool = find_cuobjdump()
        assert tool, "cuobjdump not found (PATH, CUDA_HOME/bin, or the triton package)"
        found = elf_archs(tool, so)
        missing = [s for s in want if s not in found]
        assert not missing, f"{sos[0]}: no cubin for {missing} (cuobjdump --list-elf found {found})"
        log(f"ok: cubins for {found} (wanted {want}; {tool})")
    shutil.rmtree(tmp, ignore_errors=True)
    return {"version": ver, "so": sos[0], "sms": found}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", nargs="+", help="wheel file(s) (globs are expanded)")
    ap.add_argument("--label", help="the local version label the wheel must carry, e.g. cu130torch2.14")
    ap.add_argument("--archs", help='arch list whose cubins must be in _C, e.g. "8.0;9.0a"')
    ap.add_argument("--no-abi3", action="store_true",
                    help="the wheel is version-specific (RESNET_KERNELS_PY_LIMITED_API=0)")
    args = ap.parse_args(argv)
    wheels = [w for pat in args.wheel for w in (glob.glob(pat) or [pat])]
    if len(wheels) != 1:
        print(f"want exactly one wheel, got {wheels}")
        return 1
    try:
        check(wheels[0], args.label, args.archs, abi3=not args.no_abi3)
    except AssertionError as e:
        print(f"FAIL: {e}")
        return 1
    print(f"{os.path.basename(wheels[0])}: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
