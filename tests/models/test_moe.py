"""Mixtures of experts: fused experts as per-expert linears, per-expert calibration, quantized
experts saved and loaded, for every family the architecture table lists."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

import quantlab
from quantlab.calib.blocks import ModelBlocks
from quantlab.calib.capture import run_sequential
from quantlab.methods.base import CalibConfig
from quantlab.methods.registry import get_method
from quantlab.models.arch import UnsupportedArchitectureError, linearize, resolve
from quantlab.models.moe import routed_experts
from quantlab.nn.groupwise_int_experts import GroupwiseIntExperts
from quantlab.nn.groupwise_int_linear import QuantLinear
from quantlab.pipeline import quantize_model
from tests.families import MOE_FAMILIES, tiny_moe_model
from tests.model_helpers import checkpoint_tensors


def _layer(spec: object) -> str:
    """The MoE layer's path in a block: Mixtral's checkpoints (and quantlab's model) call it
    block_sparse_moe, the others mlp."""
    return "block_sparse_moe" if getattr(spec, "stored_names", ()) else "mlp"


def _ids(seed: int, shape: tuple[int, int] = (2, 16)) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_linearized_experts_compute_what_the_fused_experts_compute(family: str) -> None:
    model = tiny_moe_model(family)
    ids = _ids(1)
    with torch.no_grad():
        fused = model(ids).logits
    with pytest.raises(UnsupportedArchitectureError, match="fused experts"):
        resolve(model)
    assert linearize(model) >= 1
    assert linearize(model) == 0  # already per-expert
    with torch.no_grad():
        per_expert = model(ids).logits
    # The same matmuls, gate and up as two products instead of one: measured 3e-7 apart.
    torch.testing.assert_close(per_expert, fused, rtol=0, atol=2e-6)
    spec = resolve(model)
    names = spec.expert_names
    layer = _layer(spec)
    layers = model.get_submodule(spec.blocks)
    moe_block = layers[len(layers) - 1]
    experts = [m for _, m in routed_experts(moe_block)]
    assert len(experts) == 1 and experts[0].num_experts == 8
    # Every expert's three projections are listed, in two stages (gate/up, then down).
    listed = spec.linears_of(moe_block)
    for e in range(8):
        for leaf in (names.gate, names.up, names.down):
            assert f"{layer}.experts.{e}.{leaf}" in listed
    first = f"{layer}.experts.0.{names.gate}"
    gate_up = next(s for s in spec.stages_of(moe_block) if any(g[0] == first for g in s))
    assert [g for g in gate_up if ".experts." in g[0]] == [
        (f"{layer}.experts.{e}.{names.gate}", f"{layer}.experts.{e}.{names.up}") for e in range(8)
    ]
    # The routers stay float and unlisted.
    assert not any(name.endswith((".gate", "shared_expert_gate")) for name in listed)


def _moe_input_and_routing(model: nn.Module, ids: torch.Tensor, block: int) -> tuple:
    """The MoE layer's input rows and the experts the router picks for each, from one forward
    of the float model."""
    spec = resolve(model)
    mlp = model.get_submodule(f"{spec.blocks}.{block}.mlp")
    seen: dict[str, torch.Tensor] = {}

    def catch(_m: nn.Module, args: tuple) -> None:
        seen["x"] = args[0].reshape(-1, args[0].shape[-1]).detach().clone()

    handle = mlp.register_forward_pre_hook(catch)
    with torch.no_grad():
        model(ids)
    handle.remove()
    with torch.no_grad():
        _, _, chosen = mlp.gate(seen["x"])
    return seen["x"], chosen


def _never_expert_5(_module: nn.Module, _args: tuple, out: tuple) -> tuple:
    logits, weights, chosen = out
    chosen = chosen.clone()
    for row in chosen:
        for k in range(row.shape[0]):
            if int(row[k]) == 5:
                row[k] = next(e for e in range(8) if e not in row.tolist())
    return logits, weights, chosen


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_each_expert_hessian_is_its_routed_tokens_gram(family: str) -> None:
    """Per-expert calibration sees the tokens the router sends: expert e's gate/up Hessian is
    2 X_e^T X_e / n_e over exactly the rows routed to e (hand-computed), and an expert that no
    token reaches gets no tokens (and the identity Hessian, reported)."""
    model = tiny_moe_model(family)
    linearize(model)
    spec = resolve(model)
    ids = _ids(3, (3, 24))
    # Keep expert 5 out of every token's choice (another expert takes its place).
    model.model.layers[1].mlp.gate.register_forward_hook(_never_expert_5)
    x, chosen = _moe_input_and_routing(model, ids, 1)
    assert not bool((chosen == 5).any())
    seen: dict[str, tuple[torch.Tensor, int]] = {}

    def on_group(i: int, block: nn.Module, group: Sequence[str], stats: dict) -> None:
        acc = stats[group[0]]
        seen[f"{i}.{group[0]}"] = (acc.hessian().clone(), acc.n_tokens)

    coverage: list = []
    run_sequential(
        ModelBlocks(model, spec.blocks, "cpu"), spec.stages_of, ids, on_group,
        batch_size=2, progress=False, min_tokens=4, coverage=coverage,
    )  # fmt: skip
    for e in range(8):
        rows = x[(chosen == e).any(dim=-1)]
        hessian, n = seen[f"1.mlp.experts.{e}.gate_proj"]
        assert n == rows.shape[0]
        if e == 5:
            assert n == 0
            torch.testing.assert_close(hessian, torch.eye(x.shape[1]), rtol=0, atol=0)
            continue
        reference = 2 * rows.T.double() @ rows.double() / rows.shape[0]
        # fp32 running averages over two batches against one fp64 product: measured 4e-7.
        torch.testing.assert_close(hessian.double(), reference, rtol=1e-5, atol=1e-5)
    fell_back = [row for row in coverage if row.white]
    assert [row.names[0] for row in fell_back] == [
        "mlp.experts.5.gate_proj",
        "mlp.experts.5.down_proj",
    ]
    assert all(row.block_tokens == 3 * 24 for row in coverage)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_routing_weighted_hessians_weight_each_routed_token(family: str) -> None:
    """With routing weights on (MoEQuant's affinity-guided Hessian), expert e's gate/up Hessian
    is 2 sum_t w_te x_t x_t^T / sum_t w_te over the rows routed to e, and its down Hessian the
    same over the expert's hidden activations: hand-computed from the router's weights."""
    model = tiny_moe_model(family)
    linearize(model)
    spec = resolve(model)
    layer = _layer(spec)
    ids = _ids(5, (3, 24))
    x, chosen = _moe_input_and_routing(model, ids, 1)
    with torch.no_grad():
        _, routing, _ = model.get_submodule(f"{spec.blocks}.1.mlp").gate(x)
    seen: dict[str, tuple[torch.Tensor, int, float]] = {}

    def on_group(i: int, block: nn.Module, group: Sequence[str], stats: dict) -> None:
        acc = stats[group[0]]
        seen[f"{i}.{group[0]}"] = (acc.hessian().clone(), acc.n_tokens, acc.weight)

    for _, experts in routed_experts(model):
        experts.weight_by_routing = True
    run_sequential(
        ModelBlocks(model, spec.blocks, "cpu"), spec.stages_of, ids, on_group,
        batch_size=2, progress=False,
    )  # fmt: skip
    names = spec.expert_names
    block = model.get_submodule(f"{spec.blocks}.1")
    for e in range(8):
        picked = chosen == e
        rows = picked.any(dim=-1)
        w = (routing * picked).sum(dim=-1)[rows].double()
        xe = x[rows].double()
        expert = block.mlp.experts.expert(e)
        with torch.no_grad():
            inner = expert.act_fn(expert.get_submodule(names.gate)(x[rows]))
            inner = (inner * expert.get_submodule(names.up)(x[rows])).double()
        for proj, inputs in ((names.gate, xe), (names.down, inner)):
            hessian, n, weight = seen[f"1.{layer}.experts.{e}.{proj}"]
            assert n == int(rows.sum()) > 0 and weight == pytest.approx(float(w.sum()), rel=1e-5)
            reference = 2 * (inputs.t() * w) @ inputs / w.sum()
            scale = float(reference.abs().max())
            # fp32 running averages over two batches against one fp64 product. Unweighted, the
            # Hessians differ by up to 3 % of the largest entry (3000x this tolerance).
            torch.testing.assert_close(hessian.double(), reference, rtol=1e-5, atol=1e-5 * scale)
    # The weights are off again after the forward: a plain call sets nothing.
    assert getattr(expert.get_submodule(names.gate), "calibration_row_weights", None) is None


def test_a_stage_over_the_memory_limit_runs_in_passes_to_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--max-stage-memory: one expert's Hessian per pass (a limit below any Hessian) quantizes
    every expert bit for bit as one pass over all of them does (the experts of a stage read
    inputs none of them writes)."""
    import quantlab.calib.capture as capture

    whole, whole_report, _ = _quantized("qwen3_moe", "gptq")
    passes: list[int] = []
    split = capture.split_stage

    def spy(block: nn.Module, stage: Sequence, max_bytes: int | None) -> list:
        parts = split(block, stage, max_bytes)
        passes.extend(len(part) for part in parts)
        return parts

    monkeypatch.setattr(capture, "split_stage", spy)
    parts, report, _ = _quantized("qwen3_moe", "gptq", max_stage_bytes=1)
    # Every stage's groups one per pass: 8 experts' gate/up, 8 downs, ... in the MoE blocks.
    assert set(passes) == {1} and len(passes) > 16
    state = parts.state_dict()
    for name, tensor in whole.state_dict().items():
        assert torch.equal(state[name], tensor), name
    # The same coverage rows (one per group), in the same order.
    assert report.coverage == whole_report.coverage


def test_hessian_capture_options_refuse_methods_without_them_and_each_other() -> None:
    with pytest.raises(ValueError, match="calibrate_all_experts and routing_weighted_hessians"):
        CalibConfig(calibrate_all_experts=True, routing_weighted_hessians=True)
    for calib, what in (
        (CalibConfig(routing_weighted_hessians=True), "routing-weighted Hessians"),
        (CalibConfig(max_stage_bytes=1 << 20), "a calibration stage memory limit"),
    ):
        for method in ("awq", "rtn", "bitstack"):
            with pytest.raises(ValueError, match=f"{what}: only .* {method!r}"):
                quantize_model(
                    tiny_moe_model("qwen3_moe"), get_method(method).config_cls(), calib=calib,
                    progress=False, samples=_ids(2, (4, 32)),
                )  # fmt: skip


def _quantized(family: str, method: str, **calib: object) -> tuple[nn.Module, object, torch.Tensor]:
    model = tiny_moe_model(family)
    ids = _ids(1)
    with torch.no_grad():
        reference = model(ids).logits
    config = get_method(method).config_cls(bits=8, group_size=32)
    report = quantize_model(
        model, config, calib=CalibConfig(batch_size=2, **calib), progress=False,
        samples=_ids(2, (4, 32)),
    )  # fmt: skip
    return model, report, reference


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_quantized_experts_save_load_and_stay_close_to_float(
    tmp_path: Path, family: str, method: str
) -> None:
    model, report, reference = _quantized(family, method)
    spec = resolve(model, float_linears=False)
    layer = _layer(spec)
    names = {row.name for row in report.layers}
    blocks = model.get_submodule(spec.blocks)
    last = len(blocks) - 1
    for e in range(8):
        assert f"{spec.blocks}.{last}.{layer}.experts.{e}.{spec.expert_names.down}" in names
        expert = blocks[last].mlp.experts.expert(e)
        assert isinstance(expert.get_submodule(spec.expert_names.gate), QuantLinear)
    # Routers float.
    assert isinstance(blocks[last].mlp.gate.weight, nn.Parameter)
    assert not any(name.endswith(".gate") for name in names)
    ids = _ids(1)
    with torch.no_grad():
        quantized = model(ids).logits
    # 8-bit groups of 32 on random weights: measured up to 0.16 (DeepSeek-V3's sigmoid router
    # flips a choice) against logits of spread ~1; a dropped expert or wrong weights give ~1.
    assert float((quantized - reference).abs().max()) < 0.5
    quantlab.save(model, str(tmp_path / "out"), report)
    loaded = quantlab.load(str(tmp_path / "out"))
    experts_path = f"{spec.blocks}.{last}.{layer}.experts"
    # Loaded groupwise experts run as one grouped op per projection (bit for bit on CPU).
    assert isinstance(loaded.get_submodule(experts_path), GroupwiseIntExperts)
    with torch.no_grad():
        again = loaded(ids).logits
    torch.testing.assert_close(again, quantized, rtol=0, atol=0)
    # It generates (with its KV cache), the same tokens as the model it was saved from.
    prompt = ids[:1, :6]
    generated = loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 12)
    assert torch.equal(
        generated, model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    )
    if method == "gptq":
        experts = report.details["experts"]
        assert (
            experts["experts"] == 8 * sum(1 for b in blocks if routed_experts(b))
            and experts["min_tokens"] == 16
        )


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lazily_loaded_experts_are_grouped_and_released(tmp_path: Path, family: str) -> None:
    """A checkpoint opened block by block (the streamed evaluation of a model larger than
    memory): each loaded block's experts are grouped and compute what the saved model's experts
    compute; releasing the block returns every expert tensor (and so the stacked storage) to the
    meta device, and loading it again groups them again."""
    from quantlab.export.load import open_checkpoint_lazily

    model = tiny_moe_model(family)
    report = quantize_model(
        model, get_method("rtn").config_cls(bits=4, group_size=32), progress=False
    )
    quantlab.save(model, str(tmp_path / "out"), report)
    spec = resolve(model, float_linears=False)
    path = f"{spec.blocks}.1.{_layer(spec)}.experts"
    saved = model.get_submodule(path)
    lazy = open_checkpoint_lazily(tmp_path / "out")
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, saved.expert(0).get_submodule(spec.expert_names.gate).in_features,
                         generator=gen)  # fmt: skip
    index = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(5)])
    weights = torch.rand(5, 2, generator=gen)
    with torch.no_grad():
        want = saved(hidden, index, weights)
    for _ in range(2):
        lazy.load(f"{spec.blocks}.1")
        experts = lazy.model.get_submodule(path)
        assert isinstance(experts, GroupwiseIntExperts)
        with torch.no_grad():
            assert torch.equal(experts(hidden, index, weights), want)
        lazy.release(f"{spec.blocks}.1")
        assert all(buf.device.type == "meta" for buf in experts.buffers())
        assert lazy.loaded_bytes() == 0


def test_calibrate_all_experts_gives_every_expert_every_token() -> None:
    _, report, _ = _quantized("qwen3_moe", "gptq", calibrate_all_experts=True)
    experts = report.details["experts"]
    assert experts["calibrate_all_experts"] is True
    assert experts["tokens_per_expert"] == {"min": 4 * 32, "median": 4 * 32, "max": 4 * 32}
    assert experts["under_min_tokens"] == []
    _, routed, _ = _quantized("qwen3_moe", "gptq")
    assert routed.details["experts"]["tokens_per_expert"]["max"] < 4 * 32
    # top-2 of 8: every token reaches two experts.
    per_block = routed.details["experts"]["per_block"]["1"]
    assert sum(per_block.values()) == 2 * 4 * 32


def test_rarely_routed_experts_fall_back_and_are_reported() -> None:
    _, report, _ = _quantized("mixtral", "gptq", expert_min_tokens=40)
    experts = report.details["experts"]
    low = [row for block in experts["per_block"].values() for row in block.values() if row < 40]
    assert len(experts["under_min_tokens"]) == len(low) > 0
    assert all(row["done"].startswith("identity Hessian") for row in experts["under_min_tokens"])


def test_routed_experts_refuse_an_expert_index_out_of_range() -> None:
    model = tiny_moe_model("mixtral")
    linearize(model)
    layer = model.model.layers[0].mlp.experts
    with pytest.raises(ValueError, match="experts 0..7"):
        layer(torch.zeros(3, 128), torch.tensor([[0, 8]] * 3), torch.ones(3, 2))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_checkpoint_streams_block_by_block_to_the_resident_result(
    tmp_path: Path, family: str
) -> None:
    """transformers writes the experts one tensor per expert projection (its checkpoint layout);
    quantlab's streamed run reads them into the per-expert linears block by block and writes the
    same checkpoint as quantizing the whole model in memory."""
    from quantlab.pipeline import quantize_checkpoint

    source = tmp_path / "source"
    tiny_moe_model(family).save_pretrained(source)
    stored = checkpoint_tensors(source)
    expected = (
        "model.layers.1.block_sparse_moe.experts.7.w2.weight"
        if family == "mixtral"
        else "model.layers.1.mlp.experts.7.down_proj.weight"
    )
    assert expected in stored
    assert not any(key.endswith("gate_up_proj") for key in stored)
    config = get_method("gptq").config_cls(bits=4, group_size=32)
    calib = CalibConfig(batch_size=2)
    samples = _ids(2, (4, 32))
    resident = tiny_moe_model(family)
    report = quantize_model(resident, config, calib=calib, samples=samples, progress=False)
    quantlab.save(resident, str(tmp_path / "resident"), report)
    streamed = quantize_checkpoint(
        source, tmp_path / "streamed", config, calib=calib, samples=samples, progress=False,
        baseline=False,
    )  # fmt: skip
    assert streamed.details["experts"]["per_block"] == report.details["experts"]["per_block"]
    want, got = checkpoint_tensors(tmp_path / "resident"), checkpoint_tensors(tmp_path / "streamed")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def _round_trip(tmp_path: Path, family: str, method: str, **options: object) -> dict:
    """Quantize a tiny mixture with ``method``, check every expert was quantized and the saved
    checkpoint loads to the same logits; returns the report's details."""
    model = tiny_moe_model(family)
    ids = _ids(1)
    with torch.no_grad():
        reference = model(ids).logits
    config = get_method(method).config_cls(**options)
    report = quantize_model(
        model, config, calib=CalibConfig(batch_size=2), progress=False, samples=_ids(2, (4, 32))
    )
    spec = resolve(model, float_linears=False)
    names = {layer.name for layer in report.layers}
    blocks = model.get_submodule(spec.blocks)
    last = len(blocks) - 1
    for e in range(8):
        for leaf in (spec.expert_names.gate, spec.expert_names.up, spec.expert_names.down):
            assert f"{spec.blocks}.{last}.{_layer(spec)}.experts.{e}.{leaf}" in names
    with torch.no_grad():
        quantized = model(ids).logits
    assert float((quantized - reference).abs().max()) < 2.0  # ternary: measured 0.8
    quantlab.save(model, str(tmp_path / method), report)
    with torch.no_grad():
        again = quantlab.load(str(tmp_path / method))(ids).logits
    torch.testing.assert_close(again, quantized, rtol=0, atol=0)
    return report.details


@pytest.mark.parametrize(
    ("family", "rounding"),
    [(family, "rtn") for family in MOE_FAMILIES] + [("qwen2_moe", "gptq")],
)
def test_awq_searches_the_norm_in_front_of_every_expert_and_each_experts_up_down(
    tmp_path: Path, family: str, rounding: str
) -> None:
    details = _round_trip(tmp_path, family, "awq", bits=4, group_size=32, rounding=rounding)
    maps = details["awq"]["maps"]
    moe_block = 1
    # The MoE layer's norm map (scored on the whole layer, router folded too) and one up -> down
    # map per expert the calibration reached.
    prevs = [m["prev"] for m in maps if m["block"] == moe_block]
    assert "post_attention_layernorm" in prevs
    per_expert = [p for p in prevs if ".experts." in p]
    starved = [
        row for row in details["experts"]["under_min_tokens"] if ".layers.1." in row["expert"]
    ]
    assert len(per_expert) == 8 - len(starved) > 0


def test_folding_awq_scales_keeps_the_router_choice() -> None:
    """The router reads the same normed input as the experts: AWQ folds the scales into its
    columns too, so the float model with folded scales routes every token the same way."""
    from quantlab.models.arch import expand_smooth_maps
    from quantlab.transforms.fold import fold_smooth_map

    model = tiny_moe_model("qwen2_moe")
    linearize(model)
    spec = resolve(model)
    block = model.model.layers[1]
    moe_map = next(m for m in expand_smooth_maps(block, spec.smooth_maps) if m.inspect == "mlp")
    assert moe_map.also == ("mlp.gate", "mlp.shared_expert_gate")
    assert len(moe_map.linears) == 2 * 8 + 2
    ids = _ids(4)
    x, chosen = _moe_input_and_routing(model, ids, 1)
    with torch.no_grad():
        before = model(ids).logits
    scales = torch.rand(128, generator=torch.Generator().manual_seed(0)) + 0.5
    fold_smooth_map(block, moe_map, scales)
    _, chosen_after = _moe_input_and_routing(model, ids, 1)
    assert torch.equal(chosen_after, chosen)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("ternary", {"solver": "gptq"}),
        ("pvq", {"bits_per_weight": 3.0, "dim": 8}),
        ("bitstack", {"n_blocks": 4, "order": "hessian"}),
    ],
)
def test_the_other_methods_quantize_every_expert(
    tmp_path: Path, method: str, options: dict
) -> None:
    details = _round_trip(tmp_path, "qwen2_moe", method, **options)
    assert details["experts"]["experts"] == 16


def _expected_float_router_keys(family: str) -> list[str]:
    layer = "block_sparse_moe" if family == "mixtral" else "mlp"
    keys = [f"model.layers.1.{layer}.gate.weight"]
    if family == "qwen2_moe":
        keys.append("model.layers.1.mlp.shared_expert_gate.weight")
    if family == "deepseek_v3":
        keys.append("model.layers.1.mlp.gate.e_score_correction_bias")
    return keys


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gptq_and_awq_exports_name_every_expert_as_serving_engines_load_it(
    tmp_path: Path, family: str, fmt: str
) -> None:
    """The names vLLM's loaders map onto their fused-expert kernels (and transformers' loaders
    merge): ``<layer>.experts.<e>.<projection>.<qweight|qzeros|scales[|g_idx]>`` per expert
    (Mixtral: ``block_sparse_moe`` and w1/w3/w2), routers in float under their own names; the
    checkpoint loads back into quantlab's layers to the same logits, bit for bit."""
    from quantlab.export.awq_checkpoint import save_awq
    from quantlab.export.compressed_tensors_checkpoint import save_compressed_tensors
    from quantlab.export.gptq_checkpoint import save_gptq

    model = tiny_moe_model(family)
    report = quantize_model(
        model, get_method("gptq").config_cls(bits=4, group_size=32, sym=fmt == "gptq"),
        calib=CalibConfig(batch_size=2), progress=False, samples=_ids(2, (4, 32)),
    )  # fmt: skip
    if fmt == "gptq":
        out = save_gptq(model, tmp_path / fmt, report.config)[0]
        suffixes = ("qweight", "qzeros", "scales", "g_idx")
    elif fmt == "awq":
        out = save_awq(model, tmp_path / fmt, report.config)
        suffixes = ("qweight", "qzeros", "scales")
    else:
        out = save_compressed_tensors(model, tmp_path / fmt, report.config)
        suffixes = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
        ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
        layer_path = f"model.layers.1.{_layer(resolve(model, float_linears=False))}"
        assert "lm_head" in ignore and f"{layer_path}.gate" in ignore
        assert not any(".experts." in name for name in ignore)
    stored = checkpoint_tensors(out)
    spec = resolve(model, float_linears=False)
    layer = _layer(spec)
    names = spec.expert_names
    for e in range(8):
        for proj in (names.gate, names.up, names.down):
            for suffix in suffixes:
                assert f"model.layers.1.{layer}.experts.{e}.{proj}.{suffix}" in stored
            assert f"model.layers.1.{layer}.experts.{e}.{proj}.weight" not in stored
    for key in _expected_float_router_keys(family):
        assert stored[key].is_floating_point(), key
    assert not any(key.endswith(("gate.qweight", "gate.weight_packed")) for key in stored)
    ids = _ids(1)
    with torch.no_grad():
        want = model(ids).logits
        got = quantlab.load(str(out))(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_transformers_loads_a_quantized_mixture_after_register(tmp_path: Path, family: str) -> None:
    """``AutoModelForCausalLM.from_pretrained`` builds the fused experts; quantlab's quantizer
    gives them per-expert quantized layers before the weights stream in."""
    from transformers import AutoModelForCausalLM

    from quantlab.integrations.transformers import register

    model = tiny_moe_model(family)
    report = quantize_model(
        model, get_method("rtn").config_cls(bits=4, group_size=32), progress=False
    )
    quantlab.save(model, str(tmp_path / "out"), report)
    register()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    spec = resolve(loaded, float_linears=False)
    experts = loaded.get_submodule(f"{spec.blocks}.1.{_layer(spec)}.experts")
    assert isinstance(experts, GroupwiseIntExperts)
    assert isinstance(experts.expert(3).get_submodule(spec.expert_names.down), QuantLinear)
    ids = _ids(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_the_command_line_reports_expert_coverage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`quantlab quantize` on a Qwen3-MoE checkpoint (the synthetic tiny preset, streamed):
    `--json` holds the coverage, the summary table prints the tokens per expert and the experts
    that fell back."""
    import json

    from quantlab.cli import main
    from scripts import make_synthetic_checkpoint as synthetic

    source = synthetic.write_checkpoint(tmp_path / "src", "tiny-moe", 2, "float32", progress=False)
    args = [
        "quantize", "--model", str(source), "--method", "gptq", "--bits", "4",
        "--group-size", "64", "--calib-samples", "4", "--calib-seq-len", "32",
        "--calib-batch-size", "2", "--expert-min-tokens", "20", "--eval-windows", "1",
        "--eval-seq-len", "64", "--out", str(tmp_path / "out"), "--json",
    ]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    experts = result["experts"]
    assert experts["experts"] == 2 * 8 and experts["min_tokens"] == 20
    per_block = experts["per_block"]
    assert all(sum(block.values()) == 2 * 4 * 32 for block in per_block.values())  # top-2
    low = sorted(
        f"model.layers.{b}.{key}"
        for b, block in per_block.items()
        for key, tokens in block.items()
        if tokens < 20
    )
    assert sorted(row["expert"] for row in experts["under_min_tokens"]) == low
    assert "calibration tokens / expert" in captured.err
    assert "experts under 20 tokens" in captured.err


def test_fair_gptq_debiases_what_every_token_reaches_and_gptqs_the_experts() -> None:
    from tests.fairness_helpers import WordTokenizer

    model = tiny_moe_model("qwen2_moe")
    config = get_method("fair-gptq").config_cls(bits=4, group_size=32, fair_layers="all")
    report = quantize_model(
        model, config, WordTokenizer(256), CalibConfig(batch_size=2), progress=False,
        samples=_ids(2, (4, 32)),
    )  # fmt: skip
    names = {row.name for row in report.layers}
    assert "model.layers.1.mlp.experts.7.down_proj" in names
    debiased = [row["name"] for row in report.details["fair-gptq"]["debiased"]]
    assert debiased and not any(".experts." in name for name in debiased)
    assert any(".shared_expert." in name for name in debiased)
