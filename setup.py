"""Build of quantlab and its kernel libraries ``quantlab._C_<family>`` (one per csrc/ family).

Environment knobs:

* ``QUANTLAB_BUILD_EXT=0``: pure-Python install (every op then runs its PyTorch reference).
* ``FORCE_CUDA=1``: build the CUDA kernels even if no GPU is visible (needs nvcc and a CUDA build of
  torch). Without it, CUDA kernels are built when torch is a CUDA build and nvcc is found.
* ``TORCH_CUDA_ARCH_LIST``: default ``8.0;8.6;8.9;9.0a``.
* ``MAX_JOBS``: parallel compile jobs (ninja).
* ``QUANTLAB_BUILD_ONLY=fam1,fam2``: build only these kernel families (csrc/ directories).

Build with ``pip install -e . --no-build-isolation`` (or ``python setup.py build_ext --inplace``)
so the extension links against the torch that is installed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import types
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))


def _want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    if os.environ.get("FORCE_CUDA") == "0":
        return False
    import torch

    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def _components() -> list[str]:
    """Kernel families: the directories of csrc/ that have a binding (``bindings/<family>.cpp``);
    ``common``, ``bindings`` and the CPU ``emulation`` of the CUDA kernels have none.

    Each becomes its own library ``quantlab._C_<family>``, so one family's build problem never
    takes the others' kernels down, and rebuilding one leaves the rest untouched.
    """
    return sorted(
        p.name
        for p in CSRC.iterdir()
        if p.is_dir() and (CSRC / "bindings" / f"{p.name}.cpp").is_file()
    )


def _kernel_sources_module() -> types.ModuleType:
    # quantlab is not importable while it is being built: load the torch-free file by path.
    spec = importlib.util.spec_from_file_location(
        "quantlab_kernel_sources", ROOT / "quantlab" / "ops" / "kernel_sources.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_ext_class(base: type, cuda_families: dict[str, bool]) -> type:
    """``base`` that, after a successful build, records per family whether it has CUDA kernels and
    the digest of their sources (quantlab/_kernel_build.json): the kernel policy only runs a
    family's CUDA kernels by default when a GPU run verified that digest."""

    class BuildExtWithRecord(base):
        def run(self) -> None:
            super().run()
            sources = _kernel_sources_module()
            target_dir = ROOT / "quantlab" if self.inplace else Path(self.build_lib) / "quantlab"
            target = target_dir / sources.BUILD_RECORD.name
            record = sources.read_build_record(target)
            merged = {f: bool(v.get("cuda")) for f, v in record.items() if isinstance(v, dict)}
            merged.update(cuda_families)  # families rebuilt now replace their earlier entries
            sources.write_build_record(CSRC, merged, target)

    return BuildExtWithRecord


def _extensions() -> tuple[list, dict]:
    if os.environ.get("QUANTLAB_BUILD_EXT", "1") == "0":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # No -mavx2/-march here: the AVX2 kernels are per-function target attributes picked at run
    # time, so the wheel stays loadable on any x86-64. OpenMP resolves to the libgomp.so.1 torch
    # already loaded (same soname), so both share one thread pool and torch.set_num_threads.
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]
    link = {"extra_link_args": ["-fopenmp"], "libraries": ["gomp"]}
    include_dirs = [str(CSRC)]
    cuda = _want_cuda()
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0a")
    extensions = []
    cuda_families: dict[str, bool] = {}
    only = [f for f in os.environ.get("QUANTLAB_BUILD_ONLY", "").split(",") if f]
    for family in _components():
        if only and family not in only:
            continue
        # Layout of a family: csrc/<family>/*.cpp (torch-free CPU kernels), csrc/<family>/*.cu
        # (torch-free CUDA kernels), csrc/bindings/<family>.cpp (schemas + CPU impls) and
        # csrc/bindings/<family>_cuda.cpp (CUDA impls).
        cpu_sources = _sources(f"{family}/*.cpp") + _sources(f"bindings/{family}.cpp")
        cuda_sources = _sources(f"bindings/{family}_cuda.cpp") + _sources(f"{family}/*.cu")
        cuda_families[family] = bool(cuda and cuda_sources)
        if cuda and cuda_sources:
            ext = CUDAExtension(
                f"quantlab._C_{family}",
                cpu_sources + cuda_sources,
                include_dirs=include_dirs,
                define_macros=[("QUANTLAB_WITH_CUDA", "1")],
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
                },
                **link,
            )
        else:
            ext = CppExtension(
                f"quantlab._C_{family}",
                cpu_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
                **link,
            )
        extensions.append(ext)
    build_ext = BuildExtension.with_options(no_python_abi_suffix=False)
    return extensions, {"build_ext": _build_ext_class(build_ext, cuda_families)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["quantlab", "quantlab.*"], exclude=["quantlab.calib*"])
    + ["quantlab.calib"],
    package_dir={"quantlab.calib": "calib"},
    package_data={
        "quantlab.calib": ["texts/*"],
        "quantlab": ["_kernel_build.json"],
        "quantlab.ops": ["verified_kernels.json"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
