"""scripts/peers/: the peer comparison scripts parse, answer --help, and measure perplexity exactly
as quantlab does (nothing is installed and no peer tool is needed)."""

from __future__ import annotations

import math
import py_compile
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PEERS = Path(__file__).resolve().parents[1] / "scripts" / "peers"
SCRIPTS = sorted(PEERS.glob("*.py"))


def _import_ppl():  # noqa: ANN202 (the module)
    sys.path.insert(0, str(PEERS))
    try:
        import ppl
    finally:
        sys.path.remove(str(PEERS))
    return ppl


def test_scripts_exist() -> None:
    names = {p.name for p in SCRIPTS}
    assert {
        "run_peers.py",
        "ppl.py",
        "peer_hqq.py",
        "peer_llmc.py",
        "peer_gptqmodel.py",
    } <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_compiles(script: Path, tmp_path: Path) -> None:
    py_compile.compile(str(script), cfile=str(tmp_path / "x.pyc"), doraise=True)


@pytest.mark.parametrize(
    "name", ["run_peers.py", "peer_hqq.py", "peer_llmc.py", "peer_gptqmodel.py"]
)
def test_help(name: str) -> None:
    # --help must work without the peer tools installed (they are imported after parsing).
    res = subprocess.run(
        [sys.executable, str(PEERS / name), "--help"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout


def test_run_peers_rejects_unknown_selection() -> None:
    res = subprocess.run(
        [sys.executable, str(PEERS / "run_peers.py"), "--only", "hqq,nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "nope" in res.stderr


def test_shared_ppl_matches_quantlab(tiny_llama: torch.nn.Module) -> None:
    from quantlab.eval.perplexity import perplexity

    ppl = _import_ppl()
    vocab = tiny_llama.config.vocab_size
    seq_len, windows = 48, 3
    gen = torch.Generator().manual_seed(1)
    # A ragged tail, as a real token stream has; both sides must drop it.
    stream = torch.randint(0, vocab, (windows * seq_len + 17,), generator=gen)
    ours = perplexity(tiny_llama, stream, seq_len=seq_len, max_windows=windows, progress=False)
    theirs = ppl.perplexity_windows(tiny_llama, stream[: windows * seq_len].view(windows, seq_len))
    assert theirs["tokens"] == ours.tokens == windows * seq_len
    assert theirs["windows"] == ours.windows
    assert theirs["nll"] == pytest.approx(ours.nll, rel=1e-6, abs=1e-7)
    assert theirs["ppl"] == pytest.approx(ours.ppl, rel=1e-6)
    assert math.isclose(theirs["ppl"], math.exp(theirs["nll"]), rel_tol=1e-12)


def test_load_ids_roundtrip_without_pickle(tmp_path: Path) -> None:
    ppl = _import_ppl()
    arr = np.arange(12, dtype=np.int64).reshape(3, 4)
    np.save(tmp_path / "ids.npy", arr, allow_pickle=False)
    ids = ppl.load_ids(tmp_path / "ids.npy")
    assert ids.dtype == torch.int64 and ids.tolist() == arr.tolist()
    np.save(tmp_path / "bad.npy", arr.astype(np.int32), allow_pickle=False)
    with pytest.raises(ValueError, match="int64"):
        ppl.load_ids(tmp_path / "bad.npy")
