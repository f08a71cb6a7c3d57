"""The command line on the real bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantlab.cli import main

pytestmark = pytest.mark.model

FAST_EVAL = ["--eval-windows", "1", "--eval-seq-len", "256", "--no-progress", "--json"]


def test_quantize_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rtn"
    assert (
        main(
            [
                "quantize",
                "--model",
                "default",
                "--method",
                "rtn",
                "--bits",
                "4",
                "--group-size",
                "64",
                "--out",
                str(out),
                *FAST_EVAL,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "quantlab quantize" in captured.err  # the summary table goes to stderr with --json
    # 4 + 16/64 + 4/64 = 4.3125, plus the padding of zero streams to whole 32-bit words (9 groups
    # of a K=576 row: 36 bits in 2 words; 24 groups of K=1536: 96 bits in 3): exactly 835/192 over
    # the 7 linears of a block.
    assert result["bits_per_weight"] == pytest.approx(835 / 192, rel=1e-12)
    # W4 g64 RTN on these 256 tokens: measured 30.61 vs 24.91 (1.23x).
    assert result["ppl_baseline"] < result["ppl"] < 1.45 * result["ppl_baseline"]
    assert result["eval_tokens"] == 256 and result["seconds"] > 0
    assert len(result["layers"]) == 210
    assert (out / "model.safetensors").is_file() and (out / "quantlab_report.json").is_file()

    assert main(["eval", "--model", str(out), "--prompt", "", *FAST_EVAL]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    # The reloaded checkpoint scores exactly what the in-memory quantized model scored.
    assert evaluated["ppl"] == pytest.approx(result["ppl"], rel=1e-6)
    assert evaluated["quantized"] is True

    # The issue-19 probe on the real model: two norms deleted used to load random-initialised
    # (0% top-1 agreement) and exit 0 with a perplexity. Now it is refused, naming them; and an
    # edit of config.json is caught by the checksums, naming the field.
    from tests.checkpoint_mutations import drop_checksums, edit_config, edit_state

    edit_config(out, lambda c: c.update(rms_norm_eps=1e-3))
    assert main(["eval", "--model", str(out), "--prompt", "", *FAST_EVAL]) == 2
    assert "changed fields: rms_norm_eps" in capsys.readouterr().err
    drop_checksums(out)
    norms = ["model.norm.weight", "model.layers.3.post_attention_layernorm.weight"]
    edit_state(out, lambda state: [state.pop(k) for k in norms])
    assert main(["eval", "--model", str(out), "--prompt", "", *FAST_EVAL]) == 2
    err = capsys.readouterr().err
    assert "missing 2 tensor(s)" in err and all(k in err for k in norms)


def test_bad_group_size_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "quantize",
            "--model",
            "default",
            "--group-size",
            "128",
            "--out",
            str(tmp_path / "x"),
            "--no-eval",
            "--no-progress",
        ]
    )
    assert code == 2
    assert "group_size 128 does not divide in_features 576" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_model_directory_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["eval", "--model", str(tmp_path / "nothing"), "--no-progress"])
    assert code == 2
    assert "no such directory" in capsys.readouterr().err
