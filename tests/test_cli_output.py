"""``quantlab quantize --out``: what it refuses (before loading the model), the free-space check,
the lock against a second writer, and that nothing outside the output is ever touched."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import quantlab
from quantlab.cli import main
from quantlab.export import atomic
from quantlab.export.checkpoint_files import CheckpointFiles
from quantlab.export.lazy_model import empty_model
from quantlab.export.output_guard import OutputTargetError, check_output_target, is_quantlab_output
from quantlab.export.save import estimate_checkpoint_bytes
from tests.lock_helpers import HOLDER_COMMAND, holding_lock


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Path:
    """A 2-block Llama (hidden 64) saved with the bundled model's tokenizer, whose vocabulary
    size it shares."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("models") / "tiny"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def model_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A copy of the tiny model inside ``tmp_path``, so the before/after snapshots cover it."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # main() sets TQDM_DISABLE for --no-progress; registering it restores it after the test.
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusals must come before the model is loaded: loading it whole, or any part of it
    (streamed), fails the test."""

    def load_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("quantlab.export.model_source.load_model", load_model)
    monkeypatch.setattr("quantlab.export.lazy_model.LazyModel.load", load_model)


def _quantize(model: Path | str, out: Path | str, *extra: str) -> int:
    return main(
        [
            "quantize",
            "--model",
            str(model),
            "--method",
            "rtn",
            "--bits",
            "4",
            "--group-size",
            "32",
            "--out",
            str(out),
            "--no-eval",
            "--no-progress",
            *extra,
        ]
    )


def _estimate(model_dir: Path, config: Any, tokenizer: Any) -> int:
    from transformers import AutoConfig

    skeleton = empty_model(AutoConfig.from_pretrained(model_dir))
    with CheckpointFiles(model_dir) as files:
        return estimate_checkpoint_bytes(files, skeleton, config, tokenizer)


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too): a file's sha256, ``<dir>`` for directories."""
    listing = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            listing[os.path.relpath(os.path.join(dirpath, name), root)] = "<dir>"
        for name in filenames:
            path = os.path.join(dirpath, name)
            listing[os.path.relpath(path, root)] = hashlib.sha256(
                Path(path).read_bytes()
            ).hexdigest()
    return listing


def _refused(
    capsys: pytest.CaptureFixture[str], root: Path, model: Path | str, out: Path | str, *extra: str
) -> str:
    """Run a quantize that must be refused; check nothing under ``root`` changed; return stderr."""
    before = _snapshot(root)
    assert _quantize(model, out, *extra) == 2
    assert _snapshot(root) == before
    return capsys.readouterr().err


@pytest.mark.usefixtures("no_model_load")
def test_existing_file_is_refused(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.txt"
    out.write_text("precious")
    err = _refused(capsys, tmp_path, model_dir, out)
    assert f"{out} exists and is a file" in err and "choose another output directory" in err


@pytest.mark.usefixtures("no_model_load")
def test_foreign_directory_is_refused_and_left_untouched(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))  # not quantized
    err = _refused(capsys, tmp_path, model_dir, out, "--overwrite")
    assert f"{out} is a non-empty directory that is not a quantlab checkpoint" in err
    assert (out / "notes.txt").read_text() == "my notes"


@pytest.mark.usefixtures("no_model_load")
def test_the_model_directory_is_refused(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refused(capsys, tmp_path, model_dir, model_dir, "--overwrite")
    assert f"{model_dir} is the input model directory" in err
    # Spelled differently, it is still the same directory.
    spelled = tmp_path / "model" / ".." / "model"
    assert "is the input model directory" in _refused(capsys, tmp_path, model_dir, spelled)


@pytest.mark.usefixtures("no_model_load")
def test_a_directory_containing_the_model_is_refused(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refused(capsys, tmp_path, model_dir, tmp_path, "--overwrite")
    assert f"{tmp_path} contains the input model directory" in err
    assert "would delete the model" in err


@pytest.mark.usefixtures("no_model_load")
def test_a_symlink_is_refused(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    err = _refused(capsys, tmp_path, model_dir, tmp_path / "link")
    assert "is a symbolic link" in err


def test_an_existing_checkpoint_is_replaced_only_with_overwrite(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ckpt"
    assert _quantize(model_dir, out) == 0
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]["config"]["bits"] == 4
    )
    capsys.readouterr()

    err = _refused(capsys, tmp_path, model_dir, out, "--bits", "8")
    assert f"{out} already holds a quantlab checkpoint; pass --overwrite" in err

    before = _snapshot(tmp_path)
    assert _quantize(model_dir, out, "--bits", "8", "--overwrite") == 0
    after = _snapshot(tmp_path)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["config"]["bits"] == 8
    # Only the checkpoint changed: no lock file, temporary directory or backup left beside it.
    outside = {k: v for k, v in after.items() if not k.startswith("ckpt")}
    assert outside == {k: v for k, v in before.items() if not k.startswith("ckpt")}
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "model"]
    assert atomic.MARKER_NAME not in os.listdir(out)


def test_an_empty_directory_is_used(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert _quantize(model_dir, out) == 0
    assert is_quantlab_output(out)
    assert sorted(os.listdir(tmp_path)) == ["empty", "model"]


@pytest.mark.usefixtures("no_model_load")
def test_a_parent_that_is_a_file_is_refused(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    err = _refused(capsys, tmp_path, model_dir, tmp_path / "file" / "out")
    assert f"cannot create the output's parent directory {tmp_path / 'file'}" in err


@pytest.mark.usefixtures("no_model_load")
def test_an_unwritable_parent_is_refused(
    tmp_path: Path,
    model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # These tests may run as root, which ignores permission bits: the lock file's creation, which
    # is what proves the parent writable, fails as in a read-only directory.
    real_open = os.open

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".quantlab-lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "open", open_)
    err = _refused(capsys, tmp_path, model_dir, tmp_path / "out")
    assert f"the output location {tmp_path} is not writable" in err
    assert "Permission denied" in err


def test_too_little_free_space_is_refused_before_quantizing(
    tmp_path: Path,
    model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import AutoTokenizer

    from quantlab.config import RTNConfig

    def quantize_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("quantized before the free-space check")

    monkeypatch.setattr("quantlab.pipeline.quantize_model", quantize_model)
    usage = SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    err = _refused(capsys, tmp_path, model_dir, tmp_path / "out")
    assert f"not enough free space for {tmp_path / 'out'}" in err
    assert f"{tmp_path} has 0.0 MiB (1000 bytes) free" in err
    needs = re.search(r"needs up to [0-9.]+ MiB \((\d+) bytes\)", err)
    assert needs is not None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = RTNConfig(bits=4, group_size=32)
    assert int(needs.group(1)) == _estimate(model_dir, config, tokenizer)


@pytest.mark.usefixtures("no_model_load")
def test_a_concurrent_writer_is_refused(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    with holding_lock(out) as proc:
        err = _refused(capsys, tmp_path, model_dir, out)
    assert f"{out} is being written by pid {proc.pid}" in err
    assert f"command: {HOLDER_COMMAND}" in err


@pytest.mark.parametrize(
    ("fmt", "group_size"), [("quantlab", 32), ("quantlab", -1), ("gptq", 32), ("awq", 32)]
)
def test_the_estimate_bounds_the_checkpoint_size(
    tmp_path: Path, tiny_model_dir: Path, fmt: str, group_size: int
) -> None:
    from transformers import AutoTokenizer

    from quantlab.config import RTNConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # Computed from the source checkpoint, before any quantization.
    estimate = _estimate(tiny_model_dir, RTNConfig(bits=4, group_size=group_size), tokenizer)
    out = tmp_path / "out"
    args = ["--format", fmt, "--group-size", str(group_size)]
    assert _quantize(tiny_model_dir, out, *args) == 0
    written = sum(f.stat().st_size for f in out.iterdir())
    assert written <= estimate <= 2 * written


def test_the_predicate_knows_quantlab_exports_of_foreign_layouts(tmp_path: Path) -> None:
    def checkpoint(name: str, qcfg: Any) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"quantization_config": qcfg}))
        return path

    assert is_quantlab_output(checkpoint("own", {"quant_method": "quantlab"}))
    assert is_quantlab_output(
        checkpoint("gptq", {"quant_method": "gptq", "meta": {"quantlab_method": "rtn"}})
    )
    assert is_quantlab_output(checkpoint("awq", {"quant_method": "awq", "quantlab": {}}))
    assert not is_quantlab_output(checkpoint("other-gptq", {"quant_method": "gptq", "meta": {}}))
    assert not is_quantlab_output(checkpoint("other-awq", {"quant_method": "awq"}))
    assert not is_quantlab_output(checkpoint("plain", None))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert not is_quantlab_output(broken)

    check_output_target(tmp_path / "gptq", overwrite=True)
    with pytest.raises(OutputTargetError, match="not a quantlab checkpoint"):
        check_output_target(broken, overwrite=True)


@pytest.mark.parametrize("fmt", ["quantlab", "gptq", "awq", "compressed-tensors"])
def test_quantize_streams_and_its_ppl_is_the_written_checkpoints(
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    fmt: str,
) -> None:
    """`quantlab quantize` streams the model block by block and measures both perplexities in
    that pass; they equal the whole-model perplexity of the source and of the written checkpoint
    (in any layout), and the summary reports memory and seconds per block."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlab.calib.data import load_text, token_stream
    from quantlab.eval.perplexity import perplexity

    out = tmp_path / "out"
    eval_args = ["--eval-windows", "2", "--eval-seq-len", "64", "--json"]
    code = main(
        ["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--group-size", "32"]
        + ["--out", str(out), "--format", fmt, "--no-progress", *eval_args]
    )
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "streamed block by block" in captured.err and "seconds / block" in captured.err
    assert len(result["block_seconds"]) == 2 and result["peak_rss_bytes"] > 0

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens = token_stream(tokenizer, load_text("wiki-eval"))
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert result["ppl_baseline"] == perplexity(source, tokens, 64, 2, progress=False).ppl
    written = quantlab.load(str(out))
    assert result["ppl"] == perplexity(written, tokens, 64, 2, progress=False).ppl
    assert result["ppl"] != result["ppl_baseline"]

    # And `quantlab eval` of what was written gives that number again (streamed where the
    # layout allows it).
    assert main(["eval", "--model", str(out), "--prompt", "", "--no-progress", *eval_args]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["ppl"] == result["ppl"]
    assert evaluated["streamed"] is True


def test_eval_skips_the_generation_check_when_the_model_does_not_fit(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The perplexity streams; the generation check needs the whole model, and a model larger
    than the memory available is not loaded for it (said in the summary, not silent)."""
    monkeypatch.setattr("quantlab.resources.available_memory_bytes", lambda: 1 << 20)
    args = ["eval", "--model", str(tiny_model_dir), "--eval-windows", "1", "--eval-seq-len"]
    assert main([*args, "64", "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["streamed"] is True and result["generation"] is None
    assert "does not fit the 0.0 GiB of memory available" in result["skipped"]
    assert "skipped" in captured.err

    monkeypatch.undo()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert main([*args, "64", "--no-progress", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["generation"] is not None and again["skipped"] is None
    assert again["ppl"] == result["ppl"]


def test_eval_loads_a_bitstack_checkpoint_to_a_memory_budget(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`quantlab eval --memory-budget` loads the BitStack prefix that fits (the perplexity of
    ``quantlab.load(..., memory_budget=)``), and refuses the option for any other layout."""
    from quantlab.calib.data import load_text, token_stream
    from quantlab.eval.perplexity import perplexity
    from quantlab.export.bitstack_checkpoint import plan_from_checkpoint

    bs = tmp_path / "bs"
    quantize = ["quantize", "--model", str(tiny_model_dir), "--method", "bitstack", "--blocks"]
    common = ["--no-progress", "--json", "--eval-windows", "1", "--eval-seq-len", "64"]
    assert main([*quantize, "3", "--calib-samples", "4", "--calib-seq-len", "64",
                 "--out", str(bs), "--no-eval", *common]) == 0  # fmt: skip
    capsys.readouterr()
    import torch
    from transformers import AutoTokenizer

    budget = plan_from_checkpoint(bs, torch.float32).config_bytes(1)
    evaluate = ["eval", "--model", str(bs), "--prompt", "", *common]
    assert main([*evaluate, "--memory-budget", str(budget)]) == 0
    small = json.loads(capsys.readouterr().out)
    assert main(evaluate) == 0
    full = json.loads(capsys.readouterr().out)
    assert (
        small["memory_budget"] == str(budget) and small["bits_per_weight"] < full["bits_per_weight"]
    )
    tokens = token_stream(AutoTokenizer.from_pretrained(tiny_model_dir), load_text("wiki-eval"))
    model = quantlab.load(str(bs), memory_budget=budget)
    assert small["ppl"] == perplexity(model, tokens, 64, 1, progress=False).ppl

    rtn = tmp_path / "rtn"
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--group-size",
                 "32", "--out", str(rtn), "--no-eval", *common]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", "--model", str(rtn), "--memory-budget", "1MB", *common]) == 2
    assert "--memory-budget applies to BitStack checkpoints" in capsys.readouterr().err


def test_version_and_the_bare_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`quantlab --version` names quantlab, torch and the kernel libraries; `quantlab` alone
    prints the commands to start with (and succeeds)."""
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"quantlab {quantlab.__version__}, python ") and "torch " in out
    assert "kernel libraries: " in out
    assert main([]) == 0
    guide = capsys.readouterr().out
    assert "quantlab quantize --method gptq" in guide and "quantlab eval --model" in guide


def test_info_describes_every_layout(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`quantlab info` on a float checkpoint and on quantlab's, GPTQ, AWQ, compressed-tensors and
    BitStack layouts: the layout, the quantized linears and their encoding, bits per weight, the
    engines, and a content hash that depends on the weights only (not on sharding)."""
    from transformers import AutoModelForCausalLM

    from quantlab.export.checkpoint_files import CheckpointFiles
    from quantlab.export.info import content_hash

    def info(path: Path, *extra: str) -> dict:
        assert main(["info", str(path), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    float_info = info(tiny_model_dir)
    assert float_info["layout"] == "float" and "vLLM" in float_info["engines"]
    assert float_info["content_hash"].startswith("sha256:")

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    report = quantlab.quantize(model, "rtn", bits=4, group_size=32, progress=False)
    seen = {}
    for fmt in ("quantlab", "gptq", "awq", "compressed-tensors"):
        out = Path(quantlab.save(model, str(tmp_path / fmt), report, format=fmt))
        got = info(out)
        assert got["layout"] == fmt, fmt
        assert got["quantized_linears"] == 14 and 4 < got["bits_per_weight"] < 5, fmt
        (encoding,) = got["modules"]
        assert "bits 4" in encoding and "group_size 32" in encoding, encoding
        assert got["method"] == "rtn" or fmt == "awq", (fmt, got["method"])
        assert got["engines"], fmt
        seen[fmt] = got
    assert "vLLM" in seen["compressed-tensors"]["engines"]
    assert "vLLM" not in seen["quantlab"]["engines"]
    assert "content_hash" not in info(tmp_path / "gptq", "--no-hash")
    # The same tensors sharded hash the same.
    sharded = tmp_path / "sharded"
    quantlab.save(model, str(sharded), report, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert content_hash(CheckpointFiles(sharded)) == content_hash(
        CheckpointFiles(tmp_path / "quantlab")
    )

    bs = tmp_path / "bs"
    common = ["--no-progress", "--no-eval", "--calib-samples", "4", "--calib-seq-len", "64"]
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "bitstack", "--blocks",
                 "3", "--out", str(bs), *common]) == 0  # fmt: skip
    capsys.readouterr()
    got = info(bs, "--no-hash")
    curve = got["budget_curve"]
    assert got["layout"] == "bitstack" and curve[0]["blocks_added"] == 0
    assert [p["memory_bytes"] for p in curve] == sorted(p["memory_bytes"] for p in curve)
    assert curve[-1]["memory_bytes"] > curve[0]["memory_bytes"]
