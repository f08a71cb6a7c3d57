"""Rerun the peer quantizers side by side with quantlab on the same text, and write the table.

Run with the main venv's python::

    python scripts/peers/run_peers.py [--with-awq] [--only hqq,llmc,...] [--out out/peers]

What it does:

1. Creates (or reuses, when the pinned versions are already installed) one venv per peer under
   ``.venv-peers/<name>`` (ignored by git through ``.venv-*/``), with the pins of
   shared/reference/environment.md section 4: ``hqq`` (hqq + torchao, CPU torch 2.13.0),
   ``llmc`` (llm-compressor, CPU torch 2.13.0), ``gptqmodel`` (GPTQModel, CUDA torch 2.14.1,
   which it needs even on CPU).
2. Writes the shared data once, from this venv and quantlab's own code (numpy ``.npy``, int64,
   nothing pickled): ``calib_ids.npy`` = ``quantlab.calib.data.calibration_samples(tok,
   "wiki-calib", 32, 512, seed=0)`` (the windows quantlab's GPTQ/AWQ draw by default), and
   ``eval_windows.npy`` = the first 10 non-overlapping 2048-token windows of
   ``token_stream(tok, load_text("wiki-eval"))`` (what ``quantlab quantize`` scores).
3. Runs ``scripts/peers/peer_<name>.py`` in each peer's venv; every peer quantizes the bundled
   fp32 model (safetensors directory, no hub) at W4 g64 and scores it with the shared
   ``scripts/peers/ppl.py`` (quantlab's perplexity definition, fp32 activations).
4. Runs quantlab itself (``quantlab quantize --model default --method rtn|gptq|awq --bits 4
   --group-size 64 --json``) and the fp32 baseline (ppl.py in this venv).
5. Merges the rows into ``<out>/peers.json`` (a row is replaced only when it is rerun, so
   ``--only`` updates part of the table) and prints a markdown table.

Selection names for ``--only``: fp32, quantlab, hqq (HQQ + torchao), llmc (llm-compressor GPTQ;
AWQ too with ``--with-awq``), gptqmodel, and llmc-awq (llm-compressor AWQ alone).

Times on the 2-core CPU (2026-12-05): venv installs about 1 min each (gptqmodel's 5.4 GB CUDA
torch: 2.5 min); fp32 eval 1-2 min; quantlab RTN/GPTQ/AWQ 1/2/3.5 min; hqq+torchao 3 min;
llm-compressor GPTQ 3 min, AWQ ~15 min; GPTQModel 5-6 min (each including its ~50 s evals).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VENV_ROOT = REPO / ".venv-peers"
ALL = ("fp32", "quantlab", "hqq", "llmc", "gptqmodel")
# Only on request: --with-awq adds it to llmc; --only llmc-awq runs it alone.
OPTIONAL = ("llmc-awq",)
CALIB = {"source": "wiki-calib", "n_samples": 32, "seq_len": 512, "seed": 0}
EVAL = {"source": "wiki-eval", "windows": 10, "seq_len": 2048}
GROUP = 64

# pip requirements per peer venv (installed in one pip call), and the pins checked for reuse.
VENVS: dict[str, dict[str, Any]] = {
    "hqq": {
        "pip": [
            "torch==2.13.0",
            "hqq==0.2.8.post1",
            "torchao==0.18.0",
            "transformers==5.23.0",
            "numpy",
        ],
        "pins": {"torch": "2.13.0", "hqq": "0.2.8.post1", "torchao": "0.18.0"},
    },
    "llmc": {
        # llmcompressor pins its own transformers (5.17.0 with 0.14.0.1).
        "pip": ["torch==2.13.0", "llmcompressor==0.14.0.1", "numpy"],
        "pins": {"torch": "2.13.0", "llmcompressor": "0.14.0.1"},
    },
    "gptqmodel": {
        "pip": ["torch==2.14.1", "gptqmodel==7.7.0", "transformers>=5.20.2", "numpy"],
        "pins": {"torch": "2.14.1", "gptqmodel": "7.7.0"},
    },
}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} x {cpu}"


def _log(msg: str) -> None:
    print(f"[run_peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _run(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = REPO
) -> tuple[int, float, float]:
    """Run ``cmd`` with stdout+stderr to ``log``; returns (exit code, seconds, peak RSS MiB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024.0


def _tail(log: Path, n: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def _venv_python(name: str) -> Path:
    return VENV_ROOT / name / "bin" / "python"


def _venv_ok(name: str) -> bool:
    py = _venv_python(name)
    if not py.is_file():
        return False
    pins = VENVS[name]["pins"]
    code = (
        "import importlib.metadata as md, json, sys; "
        f"pins = {pins!r}; "
        "bad = {d: v for d, v in pins.items() "
        "if md.version(d).split('+')[0] != v}; "
        "sys.exit(1 if bad else 0)"
    )
    return subprocess.run([str(py), "-c", code], capture_output=True).returncode == 0


def ensure_venv(name: str, logs: Path, reinstall: bool = False) -> dict[str, Any]:
    """Create or reuse ``.venv-peers/<name>``; returns how long the install took (0 if reused)."""
    if not reinstall and _venv_ok(name):
        _log(f"venv {name}: reusing {VENV_ROOT / name}")
        return {"venv": name, "reused": True, "install_seconds": 0.0}
    _log(f"venv {name}: installing {' '.join(VENVS[name]['pip'])}")
    base = getattr(sys, "_base_executable", sys.executable)
    t0 = time.perf_counter()
    rc, _, _ = _run(
        [base, "-m", "venv", "--clear", str(VENV_ROOT / name)], logs / f"venv-{name}.log"
    )
    if rc == 0:
        pip = [str(_venv_python(name)), "-m", "pip", "install", "--progress-bar", "off"]
        rc, _, _ = _run(pip + VENVS[name]["pip"], logs / f"pip-{name}.log")
    seconds = time.perf_counter() - t0
    if rc != 0 or not _venv_ok(name):
        raise RuntimeError(f"installing venv {name} failed:\n{_tail(logs / f'pip-{name}.log')}")
    _log(f"venv {name}: installed in {seconds:.0f} s")
    return {"venv": name, "reused": False, "install_seconds": round(seconds, 1)}


def write_shared_data(data: Path) -> dict[str, Any]:
    """Calibration ids and eval windows from quantlab's own code, as int64 ``.npy`` files."""
    import numpy as np
    from transformers import AutoTokenizer

    from quantlab.calib.data import calibration_samples, load_text, token_stream
    from quantlab.export.default_model import default_model_dir

    model_dir = default_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = calibration_samples(
        tok, CALIB["source"], CALIB["n_samples"], CALIB["seq_len"], CALIB["seed"]
    )
    stream = token_stream(tok, load_text(EVAL["source"]))
    n = EVAL["windows"] * EVAL["seq_len"]
    if stream.numel() < n:
        raise ValueError(f"eval text has {stream.numel()} tokens, fewer than {n}")
    windows = stream[:n].reshape(EVAL["windows"], EVAL["seq_len"])
    data.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"model_dir": str(model_dir), "calib": CALIB, "eval": EVAL}
    for fname, arr in (("calib_ids.npy", calib), ("eval_windows.npy", windows)):
        a = arr.numpy().astype(np.int64)
        np.save(data / fname, a, allow_pickle=False)
        meta[fname] = {"shape": list(a.shape), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
    meta["eval_stream_tokens"] = int(stream.numel())
    (data / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def run_fp32(model_dir: str, data: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(HERE))
    from ppl import load_ids, peak_rss_mb, perplexity_windows

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=True
    )
    res = perplexity_windows(model.eval(), load_ids(data / "eval_windows.npy"))
    return {
        "tool": "fp32",
        "version": "transformers " + md.version("transformers"),
        "torch": torch.__version__,
        "method": "fp32",
        "bits": 32,
        "group": None,
        "quantize_seconds": 0.0,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **res,
    }


def run_quantlab(method: str, out: Path, logs: Path) -> dict[str, Any]:
    """``quantlab quantize`` through its CLI (quantlab's own calibration and perplexity)."""
    ckpt = out / "ckpt" / f"quantlab-{method}"
    cmd = [sys.executable, "-m", "quantlab.cli", "quantize", "--model", "default"]
    cmd += ["--method", method, "--bits", "4", "--group-size", str(GROUP), "--out", str(ckpt)]
    cmd += ["--overwrite", "--skip-baseline", "--no-progress", "--json"]
    log = logs / f"quantlab-{method}.log"
    rc, seconds, rss = _run(cmd, log)
    if rc != 0:
        raise RuntimeError(f"quantlab {method} failed (rc {rc}):\n{_tail(log)}")
    res = None
    for line in log.read_text().splitlines():
        if line.startswith("{") and '"method"' in line:
            res = json.loads(line)
    if res is None:
        raise RuntimeError(f"quantlab {method}: no JSON line in {log}")
    import quantlab

    return {
        "tool": "quantlab",
        "version": getattr(quantlab, "__version__", None) or md.version("quantlab"),
        "method": method,
        "bits": 4,
        "group": GROUP,
        "sym": res.get("sym"),
        "command": "quantlab quantize " + " ".join(cmd[4:]),
        "quantize_seconds": round(res["quantize_seconds"], 2),
        "ppl": res["ppl"],
        "tokens": res["eval_tokens"],
        "bits_per_weight": res["bits_per_weight"],
        "wall_seconds": round(seconds, 1),
        "peak_rss_mb": round(rss, 1),
    }


def run_peer(name: str, args: list[str], model_dir: str, data: Path, logs: Path, tag: str):
    script = HERE / f"peer_{name}.py"
    cmd = [str(_venv_python(name)), str(script), "--model-dir", model_dir, "--data-dir", str(data)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("HF_HOME", str(data.parent / "hf_home"))
    env.pop("PYTHONPATH", None)
    log = logs / f"peer-{tag}.log"
    _log(f"{tag}: running {script.name} in .venv-peers/{name} (log {log})")
    # GPTQModel writes a logs/ folder into its working directory: keep it under out/.
    work = data.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    rc, seconds, rss = _run(cmd + args, log, env=env, cwd=work)
    rows = [
        json.loads(line.split(" ", 1)[1])
        for line in log.read_text(errors="replace").splitlines()
        if line.startswith("PEER_RESULT ")
    ]
    if rc != 0:
        raise RuntimeError(f"{tag} failed (rc {rc}):\n{_tail(log)}")
    for r in rows:
        r["wall_seconds_process"] = round(seconds, 1)
    return rows


def _key(row: dict[str, Any]) -> str:
    return f"{row['tool']}/{row['method']}/{row.get('group')}"


def table(rows: list[dict[str, Any]], fp32: float | None) -> str:
    lines = [
        "| tool | version | method | group | wiki ppl | ratio to fp32 | quantize time | peak RSS "
        "| date | machine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ppl'] / fp32:.3f}" if fp32 else "-"
        q = r.get("quantize_seconds")
        lines.append(
            f"| {r['tool']} | {r.get('version', '')} | {r['method']} | {r.get('group') or '-'} "
            f"| {r['ppl']:.3f} | {ratio} | {'-' if not q else f'{q:.1f} s'} "
            f"| {r.get('peak_rss_mb', 0) / 1024:.2f} GiB | {r.get('date', '')} "
            f"| {r.get('machine', '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Rerun the peer quantizers (HQQ, torchao, llm-compressor, GPTQModel) and "
        "quantlab side by side at W4 g64 on the same calibration and eval tokens.",
    )
    p.add_argument(
        "--only",
        default=",".join(ALL),
        help=f"comma list out of {','.join(ALL + OPTIONAL)} (default: all but llmc-awq)",
    )
    p.add_argument("--with-awq", action="store_true", help="also llm-compressor AWQ (~15 min)")
    p.add_argument("--out", default=str(REPO / "out" / "peers"), help="output folder")
    p.add_argument("--reinstall", action="store_true", help="recreate the peer venvs")
    p.add_argument("--install-only", action="store_true", help="only create the peer venvs")
    p.add_argument(
        "--quantlab-methods", default="rtn,gptq,awq", help="quantlab methods to run (W4 g64)"
    )
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(ALL + OPTIONAL))
    if unknown:
        p.error(f"unknown --only names {unknown}; choose from {','.join(ALL + OPTIONAL)}")
    if args.with_awq and "llmc" in only and "llmc-awq" not in only:
        only.append("llmc-awq")

    out = Path(args.out).resolve()
    logs, data = out / "logs", out / "data"
    installs = []
    for name in dict.fromkeys(n.split("-")[0] for n in only if n.split("-")[0] in VENVS):
        installs.append(ensure_venv(name, logs, args.reinstall))
    if args.install_only:
        path = out / "peers.json"
        old = json.loads(path.read_text()) if path.is_file() else {"rows": []}
        done = {i["venv"]: i for i in old.get("installs", [])}
        done.update(
            {
                i["venv"]: dict(i, date=_now(), machine=_machine())
                for i in installs
                if not i["reused"]
            }
        )
        old["installs"] = list(done.values())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(old, indent=2) + "\n")
        print(json.dumps(installs))
        return 0

    _log("writing the shared calibration ids and eval windows")
    meta = write_shared_data(data)
    model_dir = meta["model_dir"]
    stamp = {"date": _now(), "machine": _machine()}
    new: list[dict[str, Any]] = []
    failures: list[str] = []

    def add(rows: list[dict[str, Any]], step_seconds: float) -> None:
        for r in rows:
            r.update(stamp, step_seconds=round(step_seconds, 1))
            r["eval_windows_sha256"] = meta["eval_windows.npy"]["sha256"]
            _log(f"  {r['tool']} {r['method']}: ppl {r['ppl']:.3f}")
            new.append(r)

    steps: list[tuple[str, Any]] = []
    if "fp32" in only:
        steps.append(("fp32", lambda: [run_fp32(model_dir, data)]))
    if "quantlab" in only:
        for m in [m for m in args.quantlab_methods.split(",") if m]:
            steps.append((f"quantlab-{m}", lambda m=m: [run_quantlab(m, out, logs)]))
    if "hqq" in only:
        steps.append(("hqq", lambda: run_peer("hqq", [], model_dir, data, logs, "hqq")))
    if "llmc" in only:
        steps.append(
            (
                "llmc-gptq",
                lambda: run_peer("llmc", ["--method", "gptq"], model_dir, data, logs, "llmc-gptq"),
            )
        )
    if "gptqmodel" in only:
        ck = str(out / "ckpt" / "gptqmodel-gptq")
        steps.append(
            (
                "gptqmodel",
                lambda: run_peer("gptqmodel", ["--out", ck], model_dir, data, logs, "gptqmodel"),
            )
        )
    if "llmc-awq" in only:  # last: about 15 min on 2 cores
        steps.append(
            (
                "llmc-awq",
                lambda: run_peer("llmc", ["--method", "awq"], model_dir, data, logs, "llmc-awq"),
            )
        )
    for tag, fn in steps:
        _log(f"step {tag}")
        t0 = time.perf_counter()
        try:
            add(fn(), time.perf_counter() - t0)
        except Exception as exc:  # one broken peer must not lose the others' rows
            failures.append(f"{tag}: {exc}")
            _log(f"step {tag} FAILED: {exc}")

    path = out / "peers.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    rows = {_key(r): r for r in old.get("rows", [])}
    rows.update({_key(r): r for r in new})
    ordered = sorted(
        rows.values(),
        key=lambda r: (r["tool"] != "fp32", r["tool"] != "quantlab", r["tool"], r["method"]),
    )
    fp32 = next((r["ppl"] for r in ordered if r["tool"] == "fp32"), None)
    for r in ordered:
        r["ratio"] = round(r["ppl"] / fp32, 4) if fp32 else None
    install_log = {i["venv"]: i for i in old.get("installs", [])}
    # A reused venv keeps the record of the install that created it.
    install_log.update({i["venv"]: dict(i, **stamp) for i in installs if not i["reused"]})
    result = {
        "command": "python scripts/peers/run_peers.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": meta,
        "installs": list(install_log.values()),
        "rows": ordered,
        "failures": failures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(ordered, fp32))
    print(
        f"\n{path}; eval {EVAL['windows']} x {EVAL['seq_len']} tokens of {EVAL['source']}, "
        f"calib {CALIB['n_samples']} x {CALIB['seq_len']} of {CALIB['source']} "
        f"(seed {CALIB['seed']})"
    )
    if failures:
        print("FAILED: " + "; ".join(f.splitlines()[0] for f in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
