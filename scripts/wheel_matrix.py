#!/usr/bin/env python
"""Expand the wheel matrix of .github/workflows/wheels.yml into the jobs' matrices.

    python scripts/wheel_matrix.py --config "$WHEEL_MATRIX" [--probe] [--github-output "$GITHUB_OUTPUT"]
    python scripts/wheel_matrix.py --from-workflow .github/workflows/wheels.yml     # offline check

--config is the JSON document in wheels.yml (`env.WHEEL_MATRIX`):
    {"python": [...], "torch": [...], "cuda": [...],
     "archs": "8.0;9.0a",
     "exclude": [{"torch": ..., "cuda": ..., "python": ..., "why": ...}, ...]}
An exclude entry names any subset of the three axes (and says why); it removes every combination it
matches. Every value it names must be on its axis, so a stale exclude fails here instead of silently
excluding nothing.

--probe asks the PyTorch wheel index (one page per CUDA version) whether torch X.Y.Z+cuNNN exists
for each CPython and x86_64 Linux, and drops the combinations that are not published, with a
notice naming them, so the workflow keeps working when an entry is not (or no longer) served; the
combinations left must still cover at least two values of each axis, or the plan fails.

Prints (and writes to --github-output) three matrices, as {"include": [...]} JSON:
  build  one job per (torch, CUDA): the _C module is abi3 (see setup.py), so one wheel per pair
         serves every Python; it is built on the oldest Python of that pair.
  test   every (python, torch, CUDA) left: the wheel is installed on each Python on a CPU runner.
  gpu    per (torch, CUDA): its oldest and newest Python, for the self-hosted GPU runner.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
import urllib.request

INDEX = "https://download.pytorch.org/whl/{cu}/torch/"
AXES = ("python", "torch", "cuda")


def _pyver(v):
    return tuple(int(p) for p in v.split("."))


def cu_tag(cuda):
    """"13.0" -> "cu130"."""
    major, minor = cuda.split(".")[:2]
    return f"cu{major}{minor}"


def label(torch, cuda):
    """The local version label setup.py gives such a wheel (RESNET_KERNELS_LOCAL_VERSION=1)."""
    return f"{cu_tag(cuda)}torch{'.'.join(torch.split('.')[:2])}"


def workflow_matrix(path):
    """env.WHEEL_MATRIX of a workflow file, as the runner would see it."""
    try:
        from ruamel.yaml import YAML

        doc = YAML(typ="safe").load(open(path))
    except ImportError:
        import yaml

        doc = yaml.safe_load(open(path))
    return doc["env"]["WHEEL_MATRIX"]


def validate(cfg):
    for axis in AXES:
        vals = cfg.get(axis)
        if not isinstance(vals, list) or len(vals) < 2 or len(set(vals)) != len(vals):
            raise ValueError(f"matrix axis {axis!r} must list at least two distinct versions, got {vals!r}")
        for v in vals:
            if not isinstance(v, str) or not re.fullmatch(r"\d+\.\d+(\.\d+)?", v):
                raise ValueError(f"matrix axis {axis!r}: {v!r} is not a version string like '3.12' or '2.14.1'")
    if not re.fullmatch(r"\d+\.\d+a?(\+PTX)?(;\d+\.\d+a?(\+PTX)?)*", cfg.get("archs", "")):
        raise ValueError(f"archs must be an arch list like '8.0;9.0a', got {cfg.get('archs')!r}")
    for ex in cfg.get("exclude", []):
        keys = set(ex) - {"why"}
        if not keys or not keys <= set(AXES):
            raise ValueError(f"exclude entry {ex!r} must name some of {AXES} (and a 'why')")
        if not ex.get("why"):
            raise ValueError(f"exclude entry {ex!r} must say why")
        for k in keys:
            if ex[k] not in cfg[k]:
                raise ValueError(f"exclude entry {ex!r}: {k}={ex[k]!r} is not on the {k} axis {cfg[k]}")


def combinations(cfg):
    out = []
    for py, torch, cuda in itertools.product(cfg["python"], cfg["torch"], cfg["cuda"]):
        combo = {"python": py, "torch": torch, "cuda": cuda}
        if any(all(combo[k] == v for k, v in ex.items() if k != "why") for ex in cfg.get("exclude", [])):
            continue
        out.append(combo)
    return out


def _fetch(url, tries=3):
    for i in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                return r.read().decode("utf-8", "replace")
        except OSError as e:
            if i == tries - 1:
                raise RuntimeError(f"could not read {url}: {e}") from e
            time.sleep(5 * (i + 1))
    return ""


def published(combos):
    """The combinations whose torch wheel exists on the PyTorch index (Linux x86_64)."""
    pages, keep = {}, []
    for c in combos:
        cu = cu_tag(c["cuda"])
        if cu not in pages:
            pages[cu] = _fetch(INDEX.format(cu=cu))
        py = "cp" + c["python"].replace(".", "")
        pat = re.compile(rf"torch-{re.escape(c['torch'])}(%2B|\+){cu}-{py}-{py}-(manylinux|linux)[^\"'<>]*x86_64\.whl")
        if pat.search(pages[cu]):
            keep.append(c)
        else:
            print(f"::notice title=wheel matrix::torch {c['torch']}+{cu} for Python {c['python']} is not on "
                  f"{INDEX.format(cu=cu)}; that combination is skipped", file=sys.stderr)
    return keep


def plan(cfg, combos):
    if not combos:
        raise ValueError("the wheel matrix is empty after excludes")
    for axis in AXES:
        if len({c[axis] for c in combos}) < 2:
            raise ValueError(f"after excludes the matrix covers only {sorted({c[axis] for c in combos})} on the "
                             f"{axis} axis; at least two are required")
    pairs = {}
    for c in combos:
        pairs.setdefault((c["torch"], c["cuda"]), []).append(c["python"])
    build, gpu = [], []
    for (torch, cuda), pys in sorted(pairs.items()):
        pys = sorted(pys, key=_pyver)
        common = {"torch": torch, "cuda": cuda, "cu": cu_tag(cuda), "label": label(torch, cuda),
                  "archs": cfg["archs"]}
        build.append({**common, "python": pys[0]})
        for py in sorted({pys[0], pys[-1]}, key=_pyver):
            gpu.append({**common, "python": py})
    test = [{**c, "cu": cu_tag(c["cuda"]), "label": label(c["torch"], c["cuda"]), "archs": cfg["archs"]}
            for c in combos]
    return {"build": {"include": build}, "test": {"include": test}, "gpu": {"include": gpu}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="the WHEEL_MATRIX JSON document")
    src.add_argument("--from-workflow", metavar="WHEELS_YML",
                     help="read env.WHEEL_MATRIX from this workflow file (needs ruamel.yaml or PyYAML)")
    ap.add_argument("--probe", action="store_true", help="drop combinations the PyTorch index does not serve")
    ap.add_argument("--github-output", help="append build=/test=/gpu= lines to this file ($GITHUB_OUTPUT)")
    args = ap.parse_args(argv)
    cfg = json.loads(args.config if args.config is not None else workflow_matrix(args.from_workflow))
    validate(cfg)
    combos = combinations(cfg)
    if args.probe:
        combos = published(combos)
    result = plan(cfg, combos)
    lines = [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in result.items()]
    print(json.dumps(result, indent=1))
    if args.github_output:
        with open(args.github_output, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
