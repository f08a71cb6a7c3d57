"""The path from a GPU run to a verified CUDA default: scripts/gpu_session.sh runs each family's
GPU tests, scripts/record_verified_kernels.py records the families whose tests passed, merges the
record into quantlab/ops/verified_kernels.json, and quantlab.ops.kernel_policy then runs those
kernels by default on GPUs of that compute capability, for exactly those sources. Exercised here
without a GPU by standing in for torch.cuda's device queries."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from quantlab.ops import kernel_policy

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "record_verified_kernels", ROOT / "scripts" / "record_verified_kernels.py"
)
rvk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rvk)

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="{e}"
failures="{f}" skipped="{s}" tests="{t}" time="1.0"></testsuite></testsuites>"""


def _junit(
    tmp_path: Path, tests: int, failures: int = 0, errors: int = 0, skipped: int = 0
) -> Path:
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT.format(t=tests, f=failures, e=errors, s=skipped))
    return path


@pytest.fixture
def h200(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A stand-in H200 and a CUDA build of ternary whose sources have digest 'ab' * 32."""
    build = tmp_path / "_kernel_build.json"
    build.write_text(json.dumps({"ternary": {"cuda": True, "cuda_sources_sha256": "ab" * 32}}))
    monkeypatch.setattr(rvk, "BUILD_RECORD", build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    return build


def test_junit_counts(tmp_path: Path) -> None:
    counts = rvk.junit_counts(_junit(tmp_path, 10, failures=1, errors=2, skipped=3))
    assert counts == {"tests": 10, "failures": 1, "errors": 2, "skipped": 3, "passed": 4}


@pytest.mark.parametrize(
    ("counts", "why"), [((5, 1, 0, 0), "not verified"), ((4, 0, 0, 4), "not verified")]
)
def test_failed_or_all_skipped_tests_verify_nothing(
    h200: Path, tmp_path: Path, counts: tuple[int, int, int, int], why: str
) -> None:
    t, f, e, s = counts
    with pytest.raises(SystemExit, match=why):
        rvk.record("ternary", _junit(tmp_path, t, f, e, s), tmp_path / "v.json", "abc1234")
    assert not (tmp_path / "v.json").exists()


def test_a_passing_run_becomes_the_cuda_default_for_its_sources_and_gpu(
    h200: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_kernel_policy: object
) -> None:
    candidate = tmp_path / "verified.json"
    entry = rvk.record("ternary", _junit(tmp_path, 12, skipped=2), candidate, "abc1234")
    assert entry["device"] == "NVIDIA H200" and entry["compute_capability"] == "9.0"
    assert entry["tests"].startswith("10 passed, 2 skipped")
    tracked = tmp_path / "tracked.json"
    tracked.write_text(json.dumps({"about": "kept", "families": {}}))
    assert rvk.merge(candidate, tracked) == 1
    assert rvk.merge(candidate, tracked) == 0  # the same entry is not repeated
    data = json.loads(tracked.read_text())
    assert data["about"] == "kept" and data["families"]["ternary"] == [entry]

    monkeypatch.delenv(kernel_policy.ENV_VAR, raising=False)
    monkeypatch.setattr(kernel_policy, "_capability", lambda: "9.0")
    monkeypatch.setattr(kernel_policy, "read_build_record", lambda: json.loads(h200.read_text()))
    read_tracked = kernel_policy.read_verified_record
    monkeypatch.setattr(kernel_policy, "read_verified_record", lambda: read_tracked(tracked))
    decision = kernel_policy.decide("ternary", "cuda", compiled=True)
    assert decision.backend == "cuda-kernel" and "abc1234" in decision.reason


def test_merge_refuses_incomplete_or_unknown_entries(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"families": {"ternary": [{"device": "x"}]}}))
    with pytest.raises(SystemExit, match="lacks"):
        rvk.merge(bad, tmp_path / "tracked.json")
    bad.write_text(json.dumps({"families": {"marlin": []}}))
    with pytest.raises(SystemExit, match="unknown family"):
        rvk.merge(bad, tmp_path / "tracked.json")


def test_gpu_session_script_verifies_every_family_with_existing_tests() -> None:
    script = ROOT / "scripts" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    table = dict(re.findall(r'\[(\w+)\]="([^"]+)"', text))
    assert set(table) == set(rvk.FAMILIES)
    for files in table.values():
        for name in files.split():
            assert (ROOT / name).is_file(), name
    # Verification comes before any measurement.
    assert text.index('"verify-$family"') < text.index("step bench-kernels")
