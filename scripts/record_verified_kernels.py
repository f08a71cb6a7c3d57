"""Record which kernel families a GPU run verified (quantlab/ops/verified_kernels.json).

On the GPU machine, after a family's GPU tests passed (scripts/gpu_session.sh calls this only
when the family's pytest step exited 0):

    python scripts/record_verified_kernels.py record --family ternary \
        --junit out/gpu_session/junit_verify_ternary.xml --out out/gpu_session/verified.json

writes (or extends) a candidate record: the family, the digest of the CUDA sources this build
compiled (quantlab/_kernel_build.json), the GPU's name and compute capability, the date, the
commit and the test counts. Back on the development machine:

    python scripts/record_verified_kernels.py merge out/gpu_session/verified.json

adds the candidate's entries to the tracked quantlab/ops/verified_kernels.json, from which
quantlab.ops.kernel_policy makes those kernels the CUDA default on GPUs of that compute
capability, for exactly those sources.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACKED = ROOT / "quantlab" / "ops" / "verified_kernels.json"
BUILD_RECORD = ROOT / "quantlab" / "_kernel_build.json"
FAMILIES = ("groupwise_int", "ternary", "bitstack", "pvq")
_ENTRY_KEYS = ("cuda_sources_sha256", "compute_capability", "device", "date", "commit", "tests")


def junit_counts(path: Path) -> dict[str, int]:
    """Test counts of a pytest JUnit file: tests, failures, errors, skipped and passed."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    counts["skipped"] = sum(int(s.get("skipped", 0)) for s in suites)
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def _load(path: Path) -> dict:
    if not path.exists():
        return {"families": {}}
    data = json.loads(path.read_text())
    if not isinstance(data.get("families"), dict):
        raise SystemExit(f"{path}: no 'families' object")
    return data


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def record(family: str, junit: Path, out: Path, commit: str) -> dict:
    """The entry for ``family`` verified by the tests in ``junit`` on this machine's GPU."""
    import torch

    if family not in FAMILIES:
        raise SystemExit(f"unknown family {family!r}: one of {FAMILIES}")
    counts = junit_counts(junit)
    if counts["failures"] or counts["errors"] or counts["passed"] < 1:
        raise SystemExit(f"{family}: not verified, the tests report {counts}")
    build = json.loads(BUILD_RECORD.read_text()).get(family)
    if not build or not build.get("cuda"):
        raise SystemExit(f"{family}: this build has no CUDA kernels ({BUILD_RECORD})")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: a verification needs the GPU it ran on")
    major, minor = torch.cuda.get_device_capability()
    entry = {
        "cuda_sources_sha256": build["cuda_sources_sha256"],
        "compute_capability": f"{major}.{minor}",
        "device": torch.cuda.get_device_name(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "commit": commit,
        "tests": f"{counts['passed']} passed, {counts['skipped']} skipped ({junit.name})",
    }
    data = _load(out)
    data["families"].setdefault(family, []).append(entry)
    _write(out, data)
    print(f"[verified] {family}: {entry['device']} sm_{major}{minor}, {entry['tests']}")
    return entry


def merge(candidate: Path, tracked: Path = TRACKED) -> int:
    """Add the candidate's entries to the tracked record (an identical entry is not repeated)."""
    new = _load(candidate)["families"]
    data = _load(tracked)
    added = 0
    for family, entries in new.items():
        if family not in FAMILIES:
            raise SystemExit(f"{candidate}: unknown family {family!r}")
        have = data["families"].setdefault(family, [])
        for entry in entries:
            missing = [k for k in _ENTRY_KEYS if not entry.get(k)]
            if missing:
                raise SystemExit(f"{candidate}: {family} entry lacks {missing}")
            if entry not in have:
                have.append(entry)
                added += 1
    _write(tracked, data)
    print(f"[verified] merged {added} entr{'y' if added == 1 else 'ies'} into {tracked}")
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="on the GPU machine: record a family the tests verified")
    rec.add_argument("--family", required=True, choices=FAMILIES)
    rec.add_argument("--junit", required=True, type=Path)
    rec.add_argument("--out", required=True, type=Path)
    rec.add_argument("--commit", default=os.environ.get("QUANTLAB_COMMIT", "unknown"))
    mer = sub.add_parser("merge", help="here: add a GPU run's candidate record to the tracked one")
    mer.add_argument("candidate", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        record(args.family, args.junit, args.out, args.commit)
    else:
        merge(args.candidate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
