"""The bundled model (its first 6 blocks: real weights, a fifth of the time) quantized on 2 and 3
gloo ranks (CPU processes spawned by the test) against the single process, through
quantize_checkpoint as torchrun's ranks run it: wiki-calib windows, perplexity on wiki-eval
measured by rank 0 in the same pass.

What holds, per method (docs/distributed.md): RTN gives the same checkpoint bit for bit; AWQ
with RTN rounding the same scale choices and the perplexity within 5e-4; GPTQ the same packed
weights on every rank, block 0's q/k/v losses within 1e-3 of one process, and a perplexity
within 10%: the spread one process shows itself under a change of its arithmetic alone (BLAS
threads, calibration batch size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from quantlab.config import CalibConfig
from quantlab.methods.registry import config_from_dict
from quantlab.pipeline import quantize_checkpoint
from tests.distributed_helpers import one_thread, spawn_ranks

pytestmark = pytest.mark.model

N_SAMPLES, SEQ_LEN = 6, 128
EVAL_SEQ_LEN, EVAL_WINDOWS = 256, 4


def _quantize(
    source: Path, out: Path, config: dict, samples: torch.Tensor, eval_tokens: torch.Tensor,
    batch_size: int | None = None,
) -> object:  # fmt: skip
    return quantize_checkpoint(
        source,
        out,
        config_from_dict(config),
        calib=CalibConfig(n_samples=N_SAMPLES, seq_len=SEQ_LEN, batch_size=batch_size),
        samples=samples,
        progress=False,
        eval_tokens=eval_tokens,
        eval_seq_len=EVAL_SEQ_LEN,
        eval_windows=EVAL_WINDOWS,
    )


def _rank_main(rank: int, world: int, work: str, source: str, config: dict) -> dict[str, Any]:
    samples = torch.load(Path(work, "samples.pt"), weights_only=True)
    eval_tokens = torch.load(Path(work, "eval.pt"), weights_only=True)
    report = _quantize(Path(source), Path(work) / "out", config, samples, eval_tokens)
    return {
        "losses": [[row.name, row.loss] for row in report.layers],  # type: ignore[attr-defined]
        "ppl": report.ppl,  # type: ignore[attr-defined]
        "details": {
            k: v
            for k, v in report.details.items()  # type: ignore[attr-defined]
            if k in ("awq", "parallel")
        },
    }


@pytest.fixture(scope="module")
def calibration(default_tokenizer, eval_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    from quantlab.calib.data import calibration_samples

    samples = calibration_samples(default_tokenizer, "wiki-calib", N_SAMPLES, SEQ_LEN, 0)
    return samples, eval_tokens[: EVAL_SEQ_LEN * EVAL_WINDOWS].clone()


CASES = [
    ({"method": "rtn", "bits": 4, "group_size": 64}, 3),
    # AWQ's search cut to one scale form and 10 grid points: the same code paths, a third of the
    # candidates (the scale search dominates its time on one thread per rank).
    (
        {
            "method": "awq",
            "bits": 4,
            "group_size": 64,
            "search_samples": 2,
            "n_grid": 10,
            "scale_modes": ["duo"],
        },
        2,
    ),
    ({"method": "gptq", "bits": 4, "group_size": 64, "clip_search": False}, 2),
]


@pytest.mark.parametrize(("config", "world"), CASES, ids=[f"{c['method']}-{w}" for c, w in CASES])
def test_the_bundled_model_on_several_ranks(
    tmp_path: Path,
    short_default_model_path: Path,
    calibration: tuple[torch.Tensor, torch.Tensor],
    config: dict,
    world: int,
) -> None:
    source = short_default_model_path
    samples, eval_tokens = calibration
    torch.save(samples, tmp_path / "samples.pt")
    torch.save(eval_tokens, tmp_path / "eval.pt")
    ranks = spawn_ranks(_rank_main, world, tmp_path, str(source), config)
    for outcome in ranks:
        assert "error" not in outcome, outcome.get("trace")
    assert all(o["losses"] == ranks[0]["losses"] for o in ranks)
    assert all(o["details"]["parallel"] == ranks[0]["details"]["parallel"] for o in ranks)
    if config["method"] == "awq":  # the same scale choices on every rank (timings differ)
        assert all(o["details"]["awq"]["maps"] == ranks[0]["details"]["awq"]["maps"] for o in ranks)
    # Against one process calibrating on the same per-forward batches (a rank's share).
    with one_thread():  # as each rank runs
        single = _quantize(
            source, tmp_path / "single", config, samples, eval_tokens,
            N_SAMPLES // world,
        )  # fmt: skip
    written = load_file(tmp_path / "out" / "model.safetensors")
    reference = load_file(tmp_path / "single" / "model.safetensors")
    assert written.keys() == reference.keys()
    differ = sorted(k for k in reference if not torch.equal(written[k], reference[k]))
    got, expected = ranks[0]["ppl"]["ppl"], single.ppl["ppl"]  # type: ignore[attr-defined]
    if config["method"] == "rtn":
        assert not differ and got == expected
    elif config["method"] == "awq":
        assert [(m["alpha"], m["duo"]) for m in ranks[0]["details"]["awq"]["maps"]] == [
            (m["alpha"], m["duo"])
            for m in single.details["awq"]["maps"]  # type: ignore[attr-defined]
        ]
        # The scales are the same choices, equal to fp32 rounding (summed over ranks): the norms
        # they are folded into, and a group's fp16 scale here and there, differ in the last bit;
        # rounding to nearest is not chaotic, so the model agrees closely (measured 7e-5).
        assert got == pytest.approx(expected, rel=5e-4)
    else:
        # Block 0's q/k/v read the embeddings on every rank: their Hessians differ from one
        # process's by the order of the sums only, so their losses agree closely (measured 7e-5:
        # a code or two flipped; a Hessian from part of the tokens would be percents off).
        losses = dict(ranks[0]["losses"])
        single_losses = {row.name: row.loss for row in single.layers}  # type: ignore[attr-defined]
        for name in ("q_proj", "k_proj", "v_proj"):
            full = f"model.layers.0.self_attn.{name}"
            assert losses[full] == pytest.approx(single_losses[full], rel=1e-3)
        # After that GPTQ is chaotic under fp32 rounding with this little calibration (768
        # tokens for Hessians of width 576 and 1536): a flipped tie is carried along its row by
        # error feedback, giving another quantization of about the same quality. One process
        # moves as much with nothing but its arithmetic (measured on the full 30 blocks):
        # perplexity 34.16 with 2 BLAS threads and 35.63 with 1 (same windows, same batches),
        # 34.87 with 2 windows per batch instead of 3; the 2 ranks gave 36.49 (clip search off).
        # So the bound here is the spread of those equivalent runs, not 0.1%
        # (docs/distributed.md); the reduction itself is checked exactly above (block 0) and on
        # the tiny models, bit for bit.
        assert got == pytest.approx(expected, rel=0.1)
    # Rank 0's report holds every rank's traffic; the Hessians went to their owners.
    traffic = ranks[0]["details"]["parallel"]["ranks"]
    assert len(traffic) == world
    if config["method"] != "rtn":
        assert sum(row["reduce"]["bytes_in"] for row in traffic) > 0
