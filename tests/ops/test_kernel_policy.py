"""The kernel policy: which path each family's ops take, why, and that the torch path is taken.

The CUDA decisions are exercised without a GPU by standing in for the device's capability, the
build record and the verified record; the routing itself on CPU tensors by hiding the compiled
CPU kernels.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from quantlab.formats.groupwise_int import pack as pack_groupwise
from quantlab.nn.groupwise_int_linear import QuantLinear
from quantlab.ops import bitstack, groupwise_int, kernel_policy, pvq, ternary
from quantlab.ops import groupwise_int_reference as reference
from quantlab.ops.kernel_policy import KernelPathWarning
from quantlab.ops.kernel_sources import (
    cuda_source_files,
    cuda_sources_sha256,
    read_build_record,
    write_build_record,
)
from quantlab.solvers.rtn import rtn_quantize

ROOT = Path(__file__).resolve().parents[2]
DIGEST = "ab" * 32


@pytest.fixture
def policy(fresh_kernel_policy: object, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A CUDA build of groupwise_int with digest DIGEST on a capability-9.0 device, nothing
    verified, no opt-in."""
    monkeypatch.delenv(kernel_policy.ENV_VAR, raising=False)
    monkeypatch.setattr(kernel_policy, "_capability", lambda: "9.0")
    monkeypatch.setattr(
        kernel_policy,
        "read_build_record",
        lambda: {"groupwise_int": {"cuda": True, "cuda_sources_sha256": DIGEST}},
    )
    monkeypatch.setattr(kernel_policy, "read_verified_record", lambda: {})
    return monkeypatch


def _verified(digest: str = DIGEST, capability: str = "9.0") -> dict[str, list[dict[str, str]]]:
    entry = {
        "cuda_sources_sha256": digest,
        "compute_capability": capability,
        "device": "NVIDIA H200",
        "date": "2026-12-05",
        "commit": "abc1234",
    }
    return {"groupwise_int": [entry]}


def test_unverified_cuda_kernels_are_not_the_default(policy: pytest.MonkeyPatch) -> None:
    with pytest.warns(KernelPathWarning, match=r"torch path .*no GPU run has verified .*abababab"):
        decision = kernel_policy.decide("groupwise_int", "cuda", compiled=True)
    assert decision.backend == "torch" and not decision.kernel
    # Once per family and device: the second decision is cached and silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_policy.decide("groupwise_int", "cuda", compiled=True) is decision


def test_verified_sources_on_the_verified_capability_run_the_kernel(
    policy: pytest.MonkeyPatch,
) -> None:
    policy.setattr(kernel_policy, "read_verified_record", _verified)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified kernel is the quiet default
        decision = kernel_policy.decide("groupwise_int", "cuda", compiled=True)
    assert decision.backend == "cuda-kernel"
    assert "NVIDIA H200" in decision.reason and "abc1234" in decision.reason


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (lambda: _verified(digest="cd" * 32), "no GPU run has verified"),  # sources edited since
        (lambda: _verified(capability="8.0"), "compute-capability 9.0"),  # another GPU family
    ],
)
def test_a_verification_of_other_sources_or_another_gpu_does_not_count(
    policy: pytest.MonkeyPatch, record: object, why: str
) -> None:
    policy.setattr(kernel_policy, "read_verified_record", record)
    with pytest.warns(KernelPathWarning, match=why):
        assert kernel_policy.decide("groupwise_int", "cuda", compiled=True).backend == "torch"


def test_opt_in_and_opt_out(policy: pytest.MonkeyPatch) -> None:
    policy.setenv(kernel_policy.ENV_VAR, "1")
    with pytest.warns(KernelPathWarning, match="running CUDA kernels because .*=1"):
        assert kernel_policy.decide("groupwise_int", "cuda", compiled=True).backend == "cuda-kernel"
    kernel_policy.reset()
    policy.setenv(kernel_policy.ENV_VAR, "0")
    policy.setattr(kernel_policy, "read_verified_record", _verified)
    with pytest.warns(KernelPathWarning, match="=0"):  # even a verified kernel
        assert kernel_policy.decide("groupwise_int", "cuda", compiled=True).backend == "torch"
    kernel_policy.reset()
    policy.setenv(kernel_policy.ENV_VAR, "yes")
    with pytest.raises(ValueError, match="QUANTLAB_CUDA_KERNELS='yes'"):
        kernel_policy.decide("groupwise_int", "cuda", compiled=True)


def test_cuda_without_kernels_device_or_build_record(policy: pytest.MonkeyPatch) -> None:
    with pytest.warns(KernelPathWarning, match="no CUDA kernels for pvq"):
        assert kernel_policy.decide("pvq", "cuda", compiled=False).backend == "torch"
    with pytest.warns(KernelPathWarning, match="no build record"):
        assert kernel_policy.decide("bitstack", "cuda", compiled=True).backend == "torch"
    policy.setattr(kernel_policy, "_capability", lambda: None)
    with pytest.warns(KernelPathWarning, match="no CUDA device is visible"):
        assert kernel_policy.decide("ternary", "cuda", compiled=True).backend == "torch"


def _layer() -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_packed(pack_groupwise(rtn_quantize(torch.randn(24, 64), 4, 32, False)))


def test_cpu_without_its_library_runs_the_reference_and_says_so(
    fresh_kernel_policy: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hide the compiled CPU kernels of every family: the wrappers must route to the reference
    (not to the op, whose CPU kernel would still run) and warn once per family."""
    for module in (groupwise_int, ternary, bitstack, pvq):
        hidden = {k: v and k[1] != "CPU" for k, v in module._KERNELS.items()}
        monkeypatch.setattr(module, "_KERNELS", hidden)
    called: list[str] = []
    original = reference.groupwise_int_mm

    def spy(*args: object) -> torch.Tensor:
        called.append("reference")
        return original(*args)

    monkeypatch.setattr(reference, "groupwise_int_mm", spy)
    layer = _layer()
    x = torch.randn(3, 64)
    with pytest.warns(KernelPathWarning, match="groupwise_int kernel library is not built"):
        y = layer(x)
    assert called == ["reference"]
    assert torch.equal(y, original(x, layer.qweight, layer.scales, layer.qzeros, 4, 32))
    assert kernel_policy.backends_used() == {"groupwise_int": {"cpu": "torch"}}
    for module in (ternary, bitstack, pvq):
        with pytest.warns(KernelPathWarning, match=f"{module.FAMILY} kernel library is not built"):
            assert module.backend("cpu") == "torch"


@pytest.mark.skipif(not groupwise_int.compiled("cpu"), reason="CPU kernel not built")
def test_backends_used_lists_what_ran_and_compiles_into_a_graph(
    fresh_kernel_policy: object,
) -> None:
    layer = _layer()
    x = torch.randn(2, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the compiled CPU kernel is the quiet default
        want = layer(x)
    assert kernel_policy.backends_used() == {"groupwise_int": {"cpu": "cpu-kernel"}}
    kernel_policy.reset_usage()
    assert kernel_policy.backends_used() == {}
    # The decision is a constant to the compiler: the policy adds no graph break.
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), want)


def test_build_record_digest_follows_the_sources(tmp_path: Path) -> None:
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    files = {p.relative_to(csrc).as_posix() for p in cuda_source_files(csrc, "groupwise_int")}
    assert {"groupwise_int/cuda_mma_kernel.cuh", "common/bitstream.h"} <= files
    assert "bindings/groupwise_int_cuda.cpp" in files and "bindings/pvq_cuda.cpp" not in files
    before = cuda_sources_sha256(csrc, "groupwise_int")
    other = cuda_sources_sha256(csrc, "pvq")
    kernel = csrc / "groupwise_int" / "cuda_mma_kernel.cuh"
    kernel.write_text(kernel.read_text() + "\n// edited\n")
    assert cuda_sources_sha256(csrc, "groupwise_int") != before
    assert cuda_sources_sha256(csrc, "pvq") == other
    target = tmp_path / "_kernel_build.json"
    write_build_record(csrc, {"groupwise_int": True, "pvq": False}, target)
    record = read_build_record(target)
    assert record["groupwise_int"]["cuda"] is True and record["pvq"]["cuda"] is False
    assert record["groupwise_int"]["cuda_sources_sha256"] != before
    target.write_text("{not json")
    with pytest.raises(RuntimeError, match="unreadable"):
        read_build_record(target)


def test_warn_once_warns_once_per_key_until_reset(fresh_kernel_policy: object) -> None:
    with pytest.warns(KernelPathWarning, match="slower"):
        kernel_policy.warn_once("a", "slower path a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel_policy.warn_once("a", "slower path a")
    with pytest.warns(KernelPathWarning, match="path b"):
        kernel_policy.warn_once("b", "slower path b")
    kernel_policy.reset()
    with pytest.warns(KernelPathWarning):
        kernel_policy.warn_once("a", "slower path a")


def test_tracked_verified_record_is_well_formed() -> None:
    """Every recorded verification names what the policy matches on and what a reader needs."""
    data = json.loads(kernel_policy.VERIFIED_RECORD.read_text())
    families = kernel_policy.read_verified_record()
    assert set(families) <= {"groupwise_int", "ternary", "bitstack", "pvq"}, data
    for entries in families.values():
        for entry in entries:
            for key in ("cuda_sources_sha256", "compute_capability", "device", "date", "commit"):
                assert entry.get(key), (key, entry)


@pytest.mark.gpu
def test_cuda_layers_take_the_torch_path_until_a_kernel_is_verified(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a GPU, with nothing verified and no opt-in, a QuantLinear never runs a compiled CUDA
    kernel: no repacked tensor-core copy, the torch path's result, and the run reports it."""
    monkeypatch.delenv(kernel_policy.ENV_VAR, raising=False)  # undo the gpu tests' opt-in
    monkeypatch.setattr(kernel_policy, "read_verified_record", lambda: {})
    kernel_policy.reset()
    with pytest.warns(KernelPathWarning, match="groupwise_int ops on cuda: running the torch path"):
        layer = _layer().to("cuda")
        x = torch.randn(5, 64, device="cuda", dtype=torch.float16)
        y = layer(x)
    assert layer.repacked() is None and layer.kernel_path(x) == "groupwise_int_mm"
    w = reference.groupwise_int_dequant(
        layer.qweight, layer.scales, layer.qzeros, 4, 32, 64, torch.float16
    )
    assert torch.equal(y, x @ w.T)
    assert kernel_policy.backends_used() == {"groupwise_int": {"cuda": "torch"}}
