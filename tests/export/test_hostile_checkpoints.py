"""The corpus of damaged, hand-edited and inconsistent checkpoints (issue #19's probe, kept as
tests): each must be refused with a clear error naming the file, the field or tensor, never
loaded wrong, never a crash from deep inside (KeyError, IndexError, SafetensorError, ...).

Most cases remove the checksum manifest first (``drop``), as in a checkpoint written by an older
quantlab or hand-edited, so that the structural and value checks are tested on their own; the
manifest alone catches every one of them too (``test_the_manifest_catches_every_case``).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError

import quantlab
from quantlab.export.errors import CheckpointError
from tests.checkpoint_mutations import (
    WEIGHTS,
    copy_checkpoint,
    drop_checksums,
    edit_config,
    edit_header,
    edit_state,
    first_module,
    quantize_tiny,
    read_raw,
    write_checkpoint,
    write_raw,
)

KINDS = ("rtn", "rtn-sym", "untied", "bitstack", "gptq", "awq", "ternary")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``pristine(kind)``: a checkpoint of that kind written once per module (never modified)."""
    root = tmp_path_factory.mktemp("pristine")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = write_checkpoint(kind, root / kind)
        return made[kind]

    return get


@dataclass(frozen=True)
class Case:
    """One hostile input: damage a copy of a ``kind`` checkpoint, expect ``error`` matching
    ``match`` from ``quantlab.load`` (``drop``: remove the checksum manifest first)."""

    id: str
    kind: str
    damage: Callable[[Path], None]
    match: str
    error: type[Exception] = CheckpointError
    drop: bool = True


def _qcfg(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    return lambda root: edit_config(root, lambda c: edit(c["quantization_config"]))


def _spec(field: str, value: Any) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        name = first_module(root)
        edit_config(
            root, lambda c: c["quantization_config"]["modules"][name].update({field: value})
        )

    return damage


def _key(key: str | Callable[[Path], str], change: Callable[[torch.Tensor], Any]) -> Callable:
    """Replace (or delete, when ``change`` returns None) tensor ``key`` (a name, or a function of
    the checkpoint's root giving one)."""

    def damage(root: Path) -> None:
        name = key(root) if callable(key) else key

        def edit(state: dict[str, torch.Tensor]) -> None:
            new = change(state[name])
            if new is None:
                del state[name]
            else:
                state[name] = new

        edit_state(root, edit)

    return damage


def _tensor(suffix: str, change: Callable[[torch.Tensor], Any]) -> Callable:
    """:func:`_key` for the first quantized module's ``suffix`` tensor."""
    return _key(lambda root: f"{first_module(root, suffix)}.{suffix}", change)


def _entry(change: Callable[[dict[str, Any]], None], key: str | None = None) -> Callable:
    """Change one raw header entry (default: the first quantized module's qweight)."""

    def damage(root: Path) -> None:
        def edit(header: dict[str, Any]) -> None:
            name = key or f"{first_module(root)}.qweight"
            change(header[name])

        edit_header(root, edit)

    return damage


def _scale(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[3] = value
        return t

    return change


def _swap_offsets(root: Path) -> None:
    def edit(header: dict[str, Any]) -> None:
        a, b = sorted(k for k in header if k != "__metadata__")[:2]
        header[a]["data_offsets"][0] += 1

    edit_header(root, edit)


def _bitstack_spec(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        name = first_module(root, "signs")
        edit_config(root, lambda c: edit(c["quantization_config"]["modules"][name]))

    return damage


def _steps_not_permutation(spec: dict[str, Any]) -> None:
    spec["steps"][-1] += 1000


def _steps_decreasing(spec: dict[str, Any]) -> None:
    spec["steps"].reverse()


CASES = [
    # --- files and the safetensors container ------------------------------------------------
    Case("no-config", "rtn", lambda r: (r / "config.json").unlink(), "missing config.json"),
    Case(
        "config-not-json",
        "rtn",
        lambda r: (r / "config.json").write_text("{oops"),
        r"config\.json: invalid JSON",
    ),
    Case(
        "config-a-list",
        "rtn",
        lambda r: (r / "config.json").write_text("[1, 2]"),
        "expected a JSON object",
    ),
    Case("no-weights", "rtn", lambda r: (r / WEIGHTS).unlink(), "missing model.safetensors"),
    Case(
        "weights-half",
        "rtn",
        lambda r: (r / WEIGHTS).write_bytes((r / WEIGHTS).read_bytes()[:100_000]),
        "truncated",
    ),
    Case("weights-5-bytes", "rtn", lambda r: (r / WEIGHTS).write_bytes(b"\x05" * 5), "truncated"),
    Case(
        "header-length-huge",
        "rtn",
        lambda r: (r / WEIGHTS).write_bytes((10**12).to_bytes(8, "little") + b"{}"),
        "corrupt safetensors header",
    ),
    Case(
        "header-garbage",
        "rtn",
        lambda r: (r / WEIGHTS).write_bytes((16).to_bytes(8, "little") + b"\xff" * 16),
        "corrupt safetensors header",
    ),
    Case(
        "header-not-object",
        "rtn",
        lambda r: write_raw(r / WEIGHTS, [1, 2], b""),
        "not a JSON object",
    ),
    Case(
        "entry-no-offsets",
        "rtn",
        _entry(lambda e: e.pop("data_offsets")),
        r"lacks \['data_offsets'\]",
    ),
    Case("entry-no-dtype", "rtn", _entry(lambda e: e.pop("dtype")), r"lacks \['dtype'\]"),
    Case("entry-unknown-dtype", "rtn", _entry(lambda e: e.update(dtype="Q4")), "unknown dtype"),
    Case(
        "entry-negative-shape",
        "rtn",
        _entry(lambda e: e["shape"].__setitem__(0, -1)),
        "not a list of non-negative integers",
    ),
    Case(
        "entry-offsets-text",
        "rtn",
        _entry(lambda e: e.update(data_offsets="0-10")),
        r"is not \[begin, end\]",
    ),
    Case(
        "entry-size-mismatch",
        "rtn",
        _entry(lambda e: e.update(dtype="I16")),
        "needs .* bytes, data_offsets span",
    ),
    Case(
        "entry-not-object",
        "rtn",
        _entry(lambda e: e.clear() or e.update(x=1)),
        r"lacks \['dtype', 'shape', 'data_offsets'\]",
    ),
    Case("offsets-overlap", "rtn", _swap_offsets, "needs|starts at byte"),
    Case(
        "bytes-appended",
        "rtn",
        lambda r: (r / WEIGHTS).write_bytes((r / WEIGHTS).read_bytes() + b"\0" * 64),
        "after the last tensor",
    ),
    Case(
        "metadata-not-strings",
        "rtn",
        lambda r: edit_header(r, lambda h: h.update(__metadata__={"format": 1})),
        "__metadata__ must map strings",
    ),
    # --- quantization_config and module specs ------------------------------------------------
    Case(
        "no-quant-method",
        "rtn",
        _qcfg(lambda q: q.pop("quant_method")),
        "must be an object with a string quant_method",
    ),
    Case(
        "qcfg-a-list",
        "rtn",
        lambda r: edit_config(r, lambda c: c.update(quantization_config=[])),
        "quantization_config must be an object",
    ),
    Case(
        "modules-a-list",
        "rtn",
        _qcfg(lambda q: q.update(modules=list(q["modules"]))),
        "modules must be a non-empty JSON object",
    ),
    Case(
        "modules-empty",
        "rtn",
        _qcfg(lambda q: q.update(modules={})),
        "modules must be a non-empty JSON object",
    ),
    Case("spec-not-object", "rtn", _spec("bits", None), "field 'bits' must be an integer"),
    Case("sym-string-false", "rtn", _spec("sym", "false"), "field 'sym' must be true or false"),
    Case("bits-string", "rtn", _spec("bits", "4"), "field 'bits' must be an integer"),
    Case("bits-bool", "rtn", _spec("bits", True), "field 'bits' must be an integer"),
    Case("bits-5", "rtn", _spec("bits", 5), "bits must be one of"),
    Case("unknown-field", "rtn", _spec("group_szie", 64), "not part of the groupwise_int format"),
    Case("sym-true-with-qzeros", "rtn", _spec("sym", True), "has no place for: .*qzeros"),
    Case("sym-false-without-qzeros", "rtn-sym", _spec("sym", False), r"missing 1 tensor.*qzeros"),
    Case("group-size-changed", "rtn", _spec("group_size", 64), "the model expects shape"),
    Case(
        "scale-dtype-claims-bf16",
        "rtn",
        _spec("scale_dtype", "bfloat16"),
        "scales is F16 .* the format stores BF16",
    ),
    Case(
        "scale-dtype-unknown", "rtn", _spec("scale_dtype", "float8"), "scale dtype must be one of"
    ),
    Case("unknown-format", "rtn", _spec("format", "nope"), "unknown quantlab layer format 'nope'"),
    Case(
        "format-version-99",
        "rtn",
        _qcfg(lambda q: q.update(format_version=99)),
        "v99 is not readable",
    ),
    Case(
        "module-not-in-model",
        "rtn",
        _qcfg(
            lambda q: q["modules"].update(
                {"model.layers.9.mlp.up_proj": q["modules"][next(iter(q["modules"]))]}
            )
        ),
        "model.layers.9.mlp.up_proj.*lacks",
    ),
    Case(
        "module-not-a-linear",
        "rtn",
        _qcfg(
            lambda q: q["modules"].update({"model.norm": q["modules"][next(iter(q["modules"]))]})
        ),
        "model.norm.*expected nn.Linear",
    ),
    Case(
        "unsupported-architecture",
        "rtn",
        lambda r: edit_config(r, lambda c: c.update(model_type="no-such-arch")),
        "transformers cannot read this config",
    ),
    Case(
        "extra-layer-in-config",
        "rtn",
        lambda r: edit_config(r, lambda c: c.update(num_hidden_layers=3)),
        r"missing \d+ tensor\(s\): model\.layers\.2\.",
    ),
    Case(
        "hidden-size-changed",
        "rtn",
        lambda r: edit_config(r, lambda c: c.update(hidden_size=256)),
        "expects shape",
    ),
    Case(
        "vocab-changed",
        "rtn",
        lambda r: edit_config(r, lambda c: c.update(vocab_size=600)),
        "embed_tokens.weight is F32 \\[512, 128\\], the model expects shape \\[600, 128\\]",
    ),
    Case(
        "head-untied-in-config",
        "rtn",
        lambda r: edit_config(r, lambda c: c.update(tie_word_embeddings=False)),
        r"missing 1 tensor\(s\): lm_head\.weight",
    ),
    # --- tensors -----------------------------------------------------------------------------
    Case(
        "qweight-deleted", "rtn", _tensor("qweight", lambda t: None), r"missing 1 tensor.*qweight"
    ),
    Case(
        "qweight-f32",
        "rtn",
        _tensor("qweight", lambda t: t.float()),
        "qweight is F32 .* the format stores I32",
    ),
    Case(
        "scales-i16",
        "rtn",
        _tensor("scales", lambda t: t.view(torch.int16)),
        "scales is I16 .* the format stores F16",
    ),
    Case(
        "scales-bf16",
        "rtn",
        _tensor("scales", lambda t: t.to(torch.bfloat16)),
        "scales is BF16 .* the format stores F16",
    ),
    Case("scales-nan", "rtn", _tensor("scales", _scale(math.nan)), "scales holds NaN or Inf"),
    Case("scales-inf", "rtn", _tensor("scales", _scale(math.inf)), "scales holds NaN or Inf"),
    Case("scales-negative", "rtn", _tensor("scales", _scale(-0.01)), "not finite and positive"),
    Case("scales-zero", "rtn", _tensor("scales", _scale(0.0)), "not finite and positive"),
    Case(
        "embeddings-deleted",
        "rtn",
        _key("model.embed_tokens.weight", lambda t: None),
        r"missing 1 tensor\(s\): model\.embed_tokens\.weight",
    ),
    Case(
        "norms-deleted",
        "rtn",
        lambda r: edit_state(
            r,
            lambda s: [s.pop("model.norm.weight"), s.pop("model.layers.0.input_layernorm.weight")],
        ),
        r"missing 2 tensor\(s\)",
    ),
    Case(
        "untied-head-deleted",
        "untied",
        _key("lm_head.weight", lambda t: None),
        r"missing 1 tensor\(s\): lm_head\.weight",
    ),
    Case(
        "unknown-tensor",
        "rtn",
        lambda r: edit_state(r, lambda s: s.update({"model.extra.weight": torch.ones(3)})),
        "has no place for: model.extra.weight",
    ),
    Case(
        "norm-as-int",
        "rtn",
        _key("model.norm.weight", lambda t: t.to(torch.int32)),
        "model.norm.weight is I32 .* expected a float tensor",
    ),
    Case(
        "norm-wrong-shape",
        "rtn",
        _key("model.norm.weight", lambda t: t[:64].clone()),
        "model.norm.weight is F32 \\[64\\], the model expects shape \\[128\\]",
    ),
    Case(
        "embedding-nan",
        "rtn",
        _key("model.embed_tokens.weight", _scale(math.nan)),
        "model.embed_tokens.weight holds NaN or Inf",
    ),
    Case(
        "tied-head-differs",
        "rtn",
        lambda r: edit_state(
            r, lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"] + 1})
        ),
        "tied in the model but stored with different values",
    ),
    # --- checksum manifest -------------------------------------------------------------------
    Case(
        "data-byte-flipped",
        "rtn",
        lambda r: edit_header(r, lambda h: None) or _flip_last_byte(r / WEIGHTS),
        "model.safetensors differs from what quantlab wrote",
        drop=False,
    ),
    Case(
        "config-edited",
        "rtn",
        lambda r: edit_config(r, lambda c: c.update(rms_norm_eps=1e-3)),
        "config.json differs .*changed fields: rms_norm_eps",
        drop=False,
    ),
    Case(
        "manifest-not-json",
        "rtn",
        lambda r: (r / "quantlab_checksums.json").write_text("{"),
        "quantlab_checksums.json: invalid JSON",
        drop=False,
    ),
    Case(
        "manifest-lists-missing-file",
        "rtn",
        lambda r: (r / "generation_config.json").unlink(),
        "generation_config.json is missing",
        drop=False,
    ),
    # --- BitStack ----------------------------------------------------------------------------
    Case(
        "bitstack-block-bytes",
        "bitstack",
        _bitstack_spec(lambda s: s.update(block_bytes=1)),
        "block_bytes 1 but its tensors",
    ),
    Case(
        "bitstack-steps-not-permutation",
        "bitstack",
        _bitstack_spec(_steps_not_permutation),
        "not a permutation",
    ),
    Case(
        "bitstack-steps-decreasing", "bitstack", _bitstack_spec(_steps_decreasing), "not increasing"
    ),
    Case(
        "bitstack-n-blocks",
        "bitstack",
        _bitstack_spec(lambda s: s.update(n_blocks=2)),
        "steps lists 2 blocks|expects shape",
    ),
    Case(
        "bitstack-steps-text",
        "bitstack",
        _bitstack_spec(lambda s: s.update(steps="0,1")),
        "field 'steps' must be a list of integers",
    ),
    Case("bitstack-u-nan", "bitstack", _tensor("u", _scale(math.nan)), "u holds NaN or Inf"),
    # --- foreign layouts ---------------------------------------------------------------------
    Case(
        "gptq-no-bits",
        "gptq",
        _qcfg(lambda q: q.pop("bits")),
        "quantization_config field 'bits' is missing",
    ),
    Case(
        "gptq-bits-string",
        "gptq",
        _qcfg(lambda q: q.update(bits="4")),
        "field 'bits' must be an integer",
    ),
    Case(
        "gptq-sym-string",
        "gptq",
        _qcfg(lambda q: q.update(sym="true")),
        "field 'sym' must be true or false",
    ),
    Case(
        "gptq-scales-negative", "gptq", _tensor("scales", _scale(-1.0)), "not finite and positive"
    ),
    Case("gptq-qzeros-deleted", "gptq", _tensor("qzeros", lambda t: None), r"lacks \['qzeros'\]"),
    Case("awq-version-gemv", "awq", _qcfg(lambda q: q.update(version="gemv")), "GEMM layout only"),
    Case("awq-scales-nan", "awq", _tensor("scales", _scale(math.nan)), "scales hold NaN or Inf"),
    Case("ternary-scales-negative", "ternary", _tensor("scales", _scale(-1.0)), "finite and >= 0"),
    Case(
        "ternary-bad-code",
        "ternary",
        _tensor("qweight", lambda t: torch.full_like(t, 255)),
        "invalid code 3",
    ),
]


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_checkpoint_is_refused_clearly(
    case: Case, pristine: Callable[[str], Path], tmp_path: Path
) -> None:
    root = copy_checkpoint(pristine(case.kind), tmp_path / "ckpt")
    if case.drop:
        drop_checksums(root)
    case.damage(root)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    with pytest.raises(case.error, match=case.match) as info:
        quantlab.load(str(root))
    message = str(info.value)
    assert str(root) in message or "quantization_config" in message, message
    # A refused load changes nothing on disk.
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before


@pytest.mark.parametrize("case", [c for c in CASES if c.drop], ids=lambda c: c.id)
def test_the_manifest_catches_every_case(
    case: Case, pristine: Callable[[str], Path], tmp_path: Path
) -> None:
    """With the checksum manifest kept, every damage above is still a clear CheckpointError (the
    structural checks run first, so most messages are the specific ones)."""
    root = copy_checkpoint(pristine(case.kind), tmp_path / "ckpt")
    case.damage(root)
    with pytest.raises(CheckpointError):
        quantlab.load(str(root))


@pytest.mark.parametrize("kind", KINDS)
def test_pristine_checkpoints_load_and_verify(
    kind: str, pristine: Callable[[str], Path], tmp_path: Path
) -> None:
    """The corpus's starting points are sound (so each refusal above is the damage's doing): each
    loads, with or without verification, as the very model it was written from."""
    root = copy_checkpoint(pristine(kind), tmp_path / "ckpt")
    written, _ = quantize_tiny(kind)
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = written(ids).logits
        for verify in (True, False):
            assert torch.equal(quantlab.load(str(root), verify=verify)(ids).logits, want), verify


def test_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        quantlab.load(str(tmp_path / "nothing"))


def test_verify_false_skips_only_the_checksums(
    pristine: Callable[[str], Path], tmp_path: Path
) -> None:
    root = copy_checkpoint(pristine("rtn"), tmp_path / "ckpt")
    edit_config(root, lambda c: c.update(rms_norm_eps=1e-3))
    with pytest.raises(CheckpointError, match="rms_norm_eps"):
        quantlab.load(str(root))
    model = quantlab.load(str(root), verify=False)
    assert model.config.rms_norm_eps == 1e-3
    _spec("sym", "false")(root)
    with pytest.raises(CheckpointError, match="must be true or false"):
        quantlab.load(str(root), verify=False)


# --- transformers after register() -------------------------------------------------------


TRANSFORMERS_CASES = [
    c
    for c in CASES
    if c.kind in ("rtn", "rtn-sym", "untied")
    and c.id
    in {
        "qweight-deleted",
        "qweight-f32",
        "scales-bf16",
        "scales-i16",
        "scales-nan",
        "scales-negative",
        "unknown-tensor",
        "modules-a-list",
        "sym-string-false",
        "sym-true-with-qzeros",
        "embeddings-deleted",
        "untied-head-deleted",
        "extra-layer-in-config",
        "entry-no-offsets",
        "data-byte-flipped",
        "config-edited",
        "unknown-field",
        "embedding-nan",
    }
]


@pytest.mark.parametrize("case", TRANSFORMERS_CASES, ids=[c.id for c in TRANSFORMERS_CASES])
def test_transformers_loading_is_as_strict(
    case: Case, pristine: Callable[[str], Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from quantlab.integrations.transformers import register

    register()
    root = copy_checkpoint(pristine(case.kind), tmp_path / "ckpt")
    if case.drop:
        drop_checksums(root)
    case.damage(root)
    # transformers reads the safetensors header itself (for the dtype) before the quantizer
    # gets control, so damage to the container is its own SafetensorError; all else is ours.
    errors = (CheckpointError, SafetensorError) if case.id.startswith("entry-") else CheckpointError
    with pytest.raises(errors):
        AutoModelForCausalLM.from_pretrained(root)


def test_transformers_loads_a_sound_checkpoint_exactly(
    pristine: Callable[[str], Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from quantlab.integrations.transformers import register

    register()
    root = pristine("rtn")
    ours = quantlab.load(str(root))
    theirs = AutoModelForCausalLM.from_pretrained(root, dtype=torch.bfloat16)
    # A bf16 load keeps the fp16 scales bit for bit (they are the format's, not the model's).
    for name, layer in ours.named_modules():
        if isinstance(layer, quantlab.QuantLinear):
            other = theirs.get_submodule(name)
            assert other.scales.dtype == torch.float16
            assert torch.equal(other.scales, layer.scales)
            assert torch.equal(other.qweight, layer.qweight)


# --- BitStack resizing ------------------------------------------------------------------


@pytest.fixture
def budgeted(pristine: Callable[[str], Path], tmp_path: Path) -> tuple[Path, Any, Any]:
    """``(checkpoint, its plan, the model loaded at 2 steps of its order)``."""
    from quantlab.export.bitstack_checkpoint import plan_from_checkpoint

    root = copy_checkpoint(pristine("bitstack"), tmp_path / "bs")
    plan = plan_from_checkpoint(root, torch.float32)
    return root, plan, quantlab.load(str(root), memory_budget=plan.config_bytes(2))


def test_resize_refuses_a_replaced_checkpoint(budgeted: tuple[Path, Any, Any]) -> None:
    from quantlab.export.checksums import write_checksums

    root, plan, model = budgeted
    # A re-export in place: a BitStack checkpoint of the same layout and other numbers (and its
    # own, valid checksums) now sits at the path.
    new = root.parent / "new"
    shutil.copytree(root, new)
    edit_state(new, lambda s: s.update({k: v * 0.5 for k, v in s.items() if k.endswith(".u")}))
    write_checksums(new)
    shutil.rmtree(root)
    new.rename(root)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="replaced or modified since this model was loaded"):
        model.resize(plan.config_bytes(10))
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing half-changed
    # Shrinking reads nothing and still works.
    assert model.resize(plan.config_bytes(1)) == plan.config_bytes(1)


def test_resize_accepts_the_same_bytes_after_a_copy(budgeted: tuple[Path, Any, Any]) -> None:
    root, plan, model = budgeted
    copy = root.parent / "copy"
    shutil.copytree(root, copy)
    shutil.rmtree(root)
    copy.rename(root)  # new inodes, same contents
    assert model.resize(plan.config_bytes(10)) == plan.config_bytes(10)


@pytest.mark.parametrize("budget", [math.inf, float("nan"), -1, "inf MB", "1e999"])
def test_unbounded_budgets_are_refused(budget: Any, pristine: Callable[[str], Path]) -> None:
    with pytest.raises(ValueError, match="memory budget"):
        quantlab.load(str(pristine("bitstack")), memory_budget=budget)


# --- the command line -------------------------------------------------------------------


def test_eval_of_a_damaged_checkpoint_exits_2(
    pristine: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    default_tokenizer: Any,
) -> None:
    from quantlab.cli import main

    root = copy_checkpoint(pristine("rtn"), tmp_path / "ckpt")
    drop_checksums(root)
    default_tokenizer.save_pretrained(root)
    edit_state(root, lambda s: [s.pop("model.norm.weight")])
    code = main(["eval", "--model", str(root), "--no-progress", "--prompt", ""])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing 1 tensor(s): model.norm.weight" in err and str(root) in err


def test_read_raw_round_trips(pristine: Callable[[str], Path], tmp_path: Path) -> None:
    """The corpus's own header rewriter writes files the strict reader accepts unchanged."""
    root = copy_checkpoint(pristine("rtn"), tmp_path / "ckpt")
    header, data = read_raw(root / WEIGHTS)
    write_raw(root / WEIGHTS, header, data)
    drop_checksums(root)
    quantlab.load(str(root))
    assert json.loads(json.dumps(header)) == read_raw(root / WEIGHTS)[0]
