"""Build the CPU emulation of the CUDA kernels: the real csrc/ sources compiled by g++ for the CPU.

    python scripts/build_emulation.py [--flavor asan|tsan|plain ...] [--jobs N]

Each flavor is one executable, ``build/emulation/<flavor>/runner`` (csrc/emulation/runner.cpp
driving the families' own host launchers), built from:

* the kernel sources of every family (``csrc/<family>/*.cu``), unchanged except for one
  mechanical rewrite: each ``__shared__`` declaration becomes a reference to the emulator's
  per-CTA storage (:func:`rewrite_shared`), since C++ has no storage class shared by the fibers of
  one CTA only;
* ``csrc/emulation/include`` first on the include path, so ``<cuda_runtime.h>``, ``<cuda_fp16.h>``,
  ``<cuda_bf16.h>`` and ``<mma.h>`` are the emulation's, and ``QUANTLAB_EMULATION`` defined, so
  ``csrc/common/ptx.cuh`` gives the PTX wrappers their CPU implementations;
* ``csrc/emulation/runtime.cpp``: fibers, scheduler, barriers, collectives, cp.async.

Flavors: ``asan`` (AddressSanitizer + UndefinedBehaviorSanitizer: out-of-bounds global and
shared accesses, cp.async destinations read before their wait, misaligned vector accesses),
``tsan`` (ThreadSanitizer with one fiber per CUDA thread: shared-memory races between barriers),
``plain`` (-O2, no sanitizer: the fast build for the uninitialised-shared-memory differential and
larger shapes). A build is skipped when its sources and flags are unchanged (a stamp holds their
digest).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "emulation"
FAMILIES = ("groupwise_int", "ternary", "bitstack", "pvq")
FLAVORS = ("asan", "tsan", "plain")
CXX = os.environ.get("CXX", "g++")

# -ffp-contract=off: the GPU rounds every __fmul_rn / __fadd_rn separately; so must the CPU.
# -fno-strict-aliasing: the kernels type-pun through reinterpret_cast as CUDA allows.
COMMON = [
    "-std=c++20",
    "-g",
    "-ffp-contract=off",
    "-fno-strict-aliasing",
    "-fno-omit-frame-pointer",
    "-pthread",
]
FLAGS = {
    "asan": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "tsan": ["-O1", "-fsanitize=thread"],
    "plain": ["-O2"],
}

_SHARED = re.compile(
    r"^(?P<indent>[ \t]*)(?P<extern>extern[ \t]+)?__shared__[ \t]+"
    r"(?:__align__\((?P<align>\d+)\)[ \t]+)?(?P<type>[A-Za-z_][\w:<>, ]*?)[ \t]+"
    r"(?P<name>[A-Za-z_]\w*)[ \t]*(?P<dims>(?:\[[^\]]*\])*)[ \t]*;[ \t]*$",
    re.MULTILINE,
)


def rewrite_shared(source: str) -> str:
    """Turn each ``__shared__`` declaration into a reference to the emulator's per-CTA storage.

    ``extern __shared__ T name[];`` (dynamic) becomes a ``T*`` to the CTA's dynamic shared memory;
    ``__shared__ T name[d1][d2];`` a reference to an array the runtime allocates once per CTA and
    per declaration (a function-local ``static char`` tags the declaration and template instance).
    A declaration this does not recognise is left alone, and the emulated ``__shared__`` macro then
    fails the compile.
    """

    def replace(m: re.Match[str]) -> str:
        indent, typ, name, dims = m["indent"], m["type"].strip(), m["name"], m["dims"]
        if m["extern"]:
            if dims != "[]":
                raise ValueError(f"extern __shared__ {name}{dims}: expected an unsized array")
            return (
                f"{indent}{typ}* const {name} = "
                f"static_cast<{typ}*>(::quantlab_emu::dynamic_shared());"
            )
        align = m["align"] or f"alignof({typ})"
        tag = f"quantlab_emu_tag_{name}"
        pointer = f"{typ}(*){dims}" if dims else f"{typ}*"
        return (
            f"{indent}static char {tag}; "
            f"{typ}(&{name}){dims} = *static_cast<{pointer}>(::quantlab_emu::static_shared("
            f"&{tag}, sizeof({typ}{dims}), {align}));"
        )

    return _SHARED.sub(replace, source)


def _stage_sources(dest: Path) -> None:
    """Copy the CUDA sources (rewritten) and the emulation into ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    for folder in ("common", "emulation", *FAMILIES):
        for path in (CSRC / folder).rglob("*"):
            if not path.is_file():
                continue
            out = dest / path.relative_to(CSRC)
            out.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix in (".cu", ".cuh", ".h", ".cpp"):
                out.write_text(rewrite_shared(path.read_text()))
            else:
                shutil.copy2(path, out)


def _translation_units(src: Path) -> list[Path]:
    units = [src / "emulation" / "runtime.cpp", src / "emulation" / "runner.cpp"]
    for family in FAMILIES:
        units += sorted((src / family).glob("*.cu"))
    return units


def _digest(flavor: str) -> str:
    h = hashlib.sha256(" ".join([CXX, *COMMON, *FLAGS[flavor]]).encode())
    for folder in ("common", "emulation", *FAMILIES):
        for path in sorted((CSRC / folder).rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(CSRC)).encode() + b"\0" + path.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def runner_path(flavor: str) -> Path:
    return BUILD / flavor / "runner"


def _compile(flavor: str, src: Path, unit: Path, obj_dir: Path, verbose: bool) -> Path:
    obj = obj_dir / (unit.relative_to(src).as_posix().replace("/", "_") + ".o")
    obj.parent.mkdir(parents=True, exist_ok=True)
    flags = list(FLAGS[flavor])
    if flavor == "tsan" and unit.name == "runtime.cpp":
        # The scheduler's hand-offs are not the kernels' accesses: uninstrumented, with the TSan
        # fiber/acquire/release calls made explicitly (see runtime.cpp).
        flags = ["-O1", "-DQUANTLAB_EMU_TSAN"]
    include = ["-I", str(src / "emulation" / "include"), "-I", str(src)]
    lang = ["-x", "c++"] if unit.suffix == ".cu" else []
    cmd = [
        CXX,
        *COMMON,
        *flags,
        "-DQUANTLAB_EMULATION",
        *include,
        "-include",
        "cuda_runtime.h",
        "-MMD",
        "-MF",
        str(obj.with_suffix(".d")),
        *lang,
        "-c",
        str(unit),
        "-o",
        str(obj),
    ]
    if verbose:
        print(" ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"emulation build ({flavor}) failed on {unit}:\n{done.stderr}")
    return obj


def _link(flavor: str, objects: list[Path], runner: Path) -> None:
    link = [CXX, *COMMON, *FLAGS[flavor], *map(str, objects), "-o", str(runner)]
    done = subprocess.run(link, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"emulation link ({flavor}) failed:\n{done.stderr}")


def _depends_on(dep_file: Path, path: Path) -> bool:
    text = dep_file.read_text().replace("\\\n", " ")
    return str(path) in text.split()


def build(
    flavor: str,
    jobs: int = 2,
    verbose: bool = False,
    mutation: tuple[str, str, str] | None = None,
) -> Path:
    """Build (or reuse) the runner of ``flavor``; returns its path. Raises ``RuntimeError`` with
    the compiler's output when a compile fails.

    ``mutation`` = (path under csrc/, old text, new text) builds a deliberately broken variant for
    the checkers' own tests: the base build's objects are reused, and only the translation units
    that include the mutated file are recompiled.
    """
    if flavor not in FLAVORS:
        raise ValueError(f"flavor {flavor!r}: use one of {FLAVORS}")
    out_dir = BUILD / flavor
    runner = runner_path(flavor)
    stamp = out_dir / "stamp"
    digest = _digest(flavor)
    if not (runner.exists() and stamp.exists() and stamp.read_text() == digest):
        if shutil.which(CXX) is None:
            raise RuntimeError(f"{CXX} not found: the emulation needs a C++20 compiler (g++ 12+)")
        start = time.perf_counter()
        src = out_dir / "src"
        _stage_sources(src)
        units = _translation_units(src)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            objects = list(
                pool.map(lambda u: _compile(flavor, src, u, out_dir / "obj", verbose), units)
            )
        _link(flavor, objects, runner)
        stamp.write_text(digest)
        seconds = time.perf_counter() - start
        print(f"[emulation] built {flavor} runner in {seconds:.0f} s", flush=True)
    if mutation is None:
        return runner
    return _build_mutant(flavor, mutation, digest, jobs, verbose)


def _build_mutant(
    flavor: str, mutation: tuple[str, str, str], digest: str, jobs: int, verbose: bool
) -> Path:
    rel, old, new = mutation
    key = hashlib.sha256(f"{digest}\0{rel}\0{old}\0{new}".encode()).hexdigest()[:16]
    base = BUILD / flavor
    out_dir = BUILD / f"{flavor}-mutant-{key}"
    runner = out_dir / "runner"
    if runner.exists():
        return runner
    src = out_dir / "src"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(base / "src", src)
    target = src / rel
    text = target.read_text()
    if text.count(old) != 1:
        raise ValueError(f"mutation of {rel}: {old!r} occurs {text.count(old)} times, not once")
    target.write_text(text.replace(old, new))
    base_target = base / "src" / rel
    units = _translation_units(src)
    objects = []
    changed = []
    for unit in units:
        base_obj = base / "obj" / (unit.relative_to(src).as_posix().replace("/", "_") + ".o")
        if unit == target or _depends_on(base_obj.with_suffix(".d"), base_target):
            changed.append(unit)
        objects.append(base_obj)
    if not changed:
        raise ValueError(f"mutation of {rel}: no translation unit includes it")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        compiled = pool.map(lambda u: _compile(flavor, src, u, out_dir / "obj", verbose), changed)
        rebuilt = dict(zip(changed, compiled, strict=True))
    objects = [rebuilt.get(unit, obj) for unit, obj in zip(units, objects, strict=True)]
    _link(flavor, objects, runner)
    return runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", action="append", choices=FLAVORS)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    for flavor in args.flavor or FLAVORS:
        try:
            print(build(flavor, args.jobs, args.verbose))
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
