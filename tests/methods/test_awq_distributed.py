"""AWQ on several ranks (gloo, CPU processes spawned by the test) against the single process.

Each rank calibrates on its windows of the scored and of the other sequences
(:func:`rank_windows`), the mean ``|x|`` and every scale candidate's loss are reduced to every rank
in a fixed order (so every rank folds the same scales), the clip search is weight-parallel and the
rounding is RTN's or GPTQ's distributed solve.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from quantlab.calib.parallel import Parallel
from quantlab.config import CalibConfig
from quantlab.methods.awq.smoothing import rank_windows
from quantlab.methods.base import QuantizationReport
from quantlab.methods.registry import config_from_dict
from quantlab.pipeline import quantize_checkpoint, quantize_model
from tests.distributed_helpers import spawn_ranks
from tests.families import tiny_model

N_SAMPLES, SEQ_LEN = 6, 32
# Two scored sequences: with three ranks the last one scores nothing (its loss terms are zero)
# and still calibrates on its share of the other windows.
AWQ = {"method": "awq", "bits": 4, "group_size": 32, "search_samples": 2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(path)
    return path


def _samples(n: int = N_SAMPLES) -> torch.Tensor:
    return torch.randint(0, 256, (n, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def _config(rounding: str) -> dict[str, Any]:
    return {**AWQ, "rounding": rounding}


def _quantize(
    model_dir: Path, out: Path, config: dict[str, Any], n_samples: int = N_SAMPLES
) -> QuantizationReport:
    # Perplexity over 4 windows of other random tokens, measured by rank 0 in the same pass.
    eval_tokens = torch.randint(0, 256, (4 * SEQ_LEN,), generator=torch.Generator().manual_seed(1))
    return quantize_checkpoint(
        model_dir,
        out,
        config_from_dict(config),
        calib=CalibConfig(n_samples=n_samples, seq_len=SEQ_LEN),
        samples=_samples(n_samples),
        progress=False,
        eval_tokens=eval_tokens,
        eval_seq_len=SEQ_LEN,
        eval_windows=4,
    )


def _record_packed_layers(digests: dict[str, str]) -> None:
    """Make every packed layer this process builds leave a digest of its tensors in ``digests``:
    only rank 0 writes the checkpoint, but every rank holds the packed weights."""
    import quantlab.methods.gptq as gptq_method
    import quantlab.methods.rtn as rtn_method

    original = rtn_method.packed_layer

    def recording(result: Any, linear: Any, config: Any, name: str) -> Any:
        layer = original(result, linear, config, name)
        digest = hashlib.sha256()
        for key, tensor in sorted(layer.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests[name] = digest.hexdigest()
        return layer

    rtn_method.packed_layer = recording  # type: ignore[assignment]
    gptq_method.packed_layer = recording  # type: ignore[assignment]


def _rank_main(rank: int, world: int, work: str, model_dir: str, scenario: str) -> dict[str, Any]:
    outcome: dict[str, Any] = {}
    if scenario == "too-few-windows":
        # Fewer windows than ranks: the checkpoint pipeline and AWQ itself refuse.
        errors = []
        for run in (
            lambda: _quantize(Path(model_dir), Path(work) / "out", _config("rtn"), world - 1),
            lambda: quantize_model(
                tiny_model("llama"),
                config_from_dict(_config("gptq")),
                samples=_samples(world - 1),
                progress=False,
            ),
        ):
            try:
                run()
                errors.append(None)
            except ValueError as error:
                errors.append(str(error))
        outcome["errors"] = errors
    else:
        if scenario == "fail" and rank == 1:
            # A failure inside one rank's share of a scale-search loss.
            import quantlab.methods.awq.smoothing as smoothing

            def broken(*args: object) -> object:
                raise FloatingPointError("injected failure in the scale search")

            smoothing.output_sse = broken  # type: ignore[assignment]
        digests: dict[str, str] = {}
        _record_packed_layers(digests)
        rounding = "rtn" if scenario == "fail" else scenario
        report = _quantize(Path(model_dir), Path(work) / "out", _config(rounding))
        outcome["maps"] = report.details["awq"]["maps"]
        outcome["clipped"] = report.details["awq"]["clipped"]
        outcome["losses"] = [[row.name, row.loss] for row in report.layers]
        outcome["digests"] = digests
        outcome["ppl"] = report.ppl
    return outcome


def _spawn(tmp_path: Path, model_dir: Path, world: int, scenario: str) -> list[dict[str, Any]]:
    return spawn_ranks(_rank_main, world, tmp_path, str(model_dir), scenario)


@pytest.mark.parametrize(("n_samples", "n_scored"), [(6, 2), (6, 4), (6, 6), (7, 3), (3, 1)])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_windows_split_the_scored_and_the_other_windows(
    n_samples: int, n_scored: int, world: int
) -> None:
    scored: list[int] = []
    others: list[int] = []
    for rank in range(world):
        mine_scored, mine_others = rank_windows(n_samples, n_scored, Parallel(rank, world))
        # Every rank calibrates on something, and the ranks' loads differ by one window at most.
        sizes = (mine_scored.stop - mine_scored.start) + (mine_others.stop - mine_others.start)
        assert n_samples // world <= sizes <= -(-n_samples // world)
        scored += range(mine_scored.start, mine_scored.stop)
        others += range(mine_others.start, mine_others.stop)
    # Together the ranks score the windows one process scores and calibrate on all the others.
    assert scored == list(range(n_scored))
    assert others == list(range(n_scored, n_samples))


def test_rank_windows_refuse_fewer_windows_than_ranks() -> None:
    with pytest.raises(ValueError, match="2 calibration windows for 3 ranks"):
        rank_windows(2, 2, Parallel(0, 3))


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
@pytest.mark.parametrize("world", [2, 3])
def test_awq_on_several_ranks_matches_the_single_process(
    tmp_path: Path, model_dir: Path, world: int, rounding: str
) -> None:
    single = _quantize(model_dir, tmp_path / "single", _config(rounding))
    ranks = _spawn(tmp_path, model_dir, world, rounding)
    for outcome in ranks:
        assert "error" not in outcome, outcome.get("trace")
    # Every rank holds the same packed weights and made the same choices, losses included to the
    # last bit: the mean |x| and every candidate's loss are reduced in one fixed order onto every
    # rank, and each clip threshold and rounded layer is computed by one owner and broadcast.
    for outcome in ranks[1:]:
        for key in ("maps", "clipped", "losses", "digests"):
            assert outcome[key] == ranks[0][key], key
    assert len(ranks[0]["digests"]) == len(single.layers)

    # Against one process: each rank's forward runs on its own windows and the statistics are
    # summed in another order, so the mean |x|, the candidates' losses and the Gram matrices agree
    # to fp32 rounding, not bit for bit. The scale search still makes the same choices (no two
    # candidates are that close here), with losses within 2e-7 (measured).
    expected = single.details["awq"]["maps"]
    got = ranks[0]["maps"]
    assert [(m["block"], m["prev"], m["alpha"], m["duo"]) for m in got] == [
        (m["block"], m["prev"], m["alpha"], m["duo"]) for m in expected
    ]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert mine["base_loss"] == pytest.approx(theirs["base_loss"], rel=1e-5)
    written = load_file(tmp_path / "out" / "model.safetensors")
    reference = load_file(tmp_path / "single" / "model.safetensors")
    assert written.keys() == reference.keys()
    differing = [key for key, tensor in reference.items() if not torch.equal(written[key], tensor)]
    # The same scales are computed from a mean |x| that differs in its last bits, so the norms
    # they are folded into differ by fp32 rounding: measured 3e-7 at most, on a few channels.
    norms = [key for key in differing if key.endswith("norm.weight")]
    for key in norms:
        torch.testing.assert_close(written[key], reference[key], rtol=1e-6, atol=0.0)
    if rounding == "rtn":
        # RTN rounds the folded and clipped weights to the same codes and scales: every packed
        # tensor (and everything but those norms) is the single process's, bit for bit (measured
        # on 2 and 3 ranks; a rounding tie at the last bit of a folded weight could flip a code,
        # and none does here). The perplexity moves with the norms only: measured 1.2e-7.
        assert differing == norms
        assert ranks[0]["ppl"]["ppl"] == pytest.approx(single.ppl["ppl"], rel=1e-5)
    else:
        # GPTQ's Hessians are data-parallel sums too, and its error feedback carries a code that
        # flips on a near-tie through the rest of the row and into the next layers' Hessians:
        # measured on 2 ranks, one code of block 1's v_proj and then most of block 1's codes
        # differ (3 ranks: the same codes). The layer losses then agree statistically (measured
        # within 0.35%) and the perplexity within 0.1% (measured 0.03%).
        expected_losses = {row.name: row.loss for row in single.layers}
        got_losses = dict(ranks[0]["losses"])
        assert list(got_losses) == list(expected_losses)
        for name, loss in expected_losses.items():
            assert got_losses[name] == pytest.approx(loss, rel=0.05), name
        assert ranks[0]["ppl"]["ppl"] == pytest.approx(single.ppl["ppl"], rel=1e-3)
    # Only rank 0 wrote, and wrote the complete checkpoint.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir()
    )


def test_more_ranks_than_calibration_windows_are_refused(tmp_path: Path, model_dir: Path) -> None:
    ranks = _spawn(tmp_path, model_dir, 3, "too-few-windows")
    for outcome in ranks:
        assert "error" not in outcome, outcome.get("trace")
        message = (
            "2 calibration windows for 3 ranks: every rank needs at least one; use more "
            "calibration samples or fewer ranks"
        )
        assert outcome["errors"] == [message, message]
    assert not (tmp_path / "out").exists()


def test_a_rank_failing_in_the_scale_search_stops_every_rank(
    tmp_path: Path, model_dir: Path
) -> None:
    """Each candidate's loss gathers every rank's part: a rank whose part fails does not leave
    the others waiting; every rank stops with its error and nothing is written."""
    ranks = _spawn(tmp_path, model_dir, 2, "fail")
    assert ranks[1]["error"] == ["FloatingPointError", "injected failure in the scale search"]
    kind, message = ranks[0]["error"]
    assert kind == "DistributedFailure", ranks[0].get("trace")
    assert message == "rank 1 of 2 failed: FloatingPointError: injected failure in the scale search"
    assert not (tmp_path / "out").exists()
