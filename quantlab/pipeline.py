"""Whole-model entry points: :func:`quantize_model` (any registered method),
:func:`quantize_checkpoint` (the same, streamed block by block from a checkpoint directory into a
new one) and :func:`replace_linear` (RTN on any torch model).

Nothing in quantlab imports this module but the public API and the CLI: each method's
orchestration lives in :mod:`quantlab.methods`, what methods share in
:mod:`quantlab.methods.base` (re-exported here: :class:`QuantizationReport` and
:class:`LayerReport`, the report :func:`quantize_model` returns).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.calib.activations import ActivationStore
from quantlab.calib.blocks import ModelBlocks, WeightSource
from quantlab.calib.parallel import Parallel
from quantlab.formats.tensor_layout import dtype_from_name
from quantlab.methods.base import (
    CalibConfig,
    LayerReport,
    MethodContext,
    QuantizationReport,
    packed_layer,
)
from quantlab.methods.registry import get_method
from quantlab.methods.rtn import RTNConfig
from quantlab.models.arch import excluded, linearize, resolve
from quantlab.models.moe import coverage_summary, routed_experts
from quantlab.nn.groupwise_int_experts import stack_groupwise_experts
from quantlab.nn.swap import set_submodule
from quantlab.resources import PeakMemory
from quantlab.solvers.rtn import rtn_quantize

__all__ = [
    "LayerReport",
    "QuantizationReport",
    "quantize_checkpoint",
    "quantize_model",
    "replace_linear",
]


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: Any,
    tokenizer: Any = None,
    calib: CalibConfig | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    samples: torch.Tensor | None = None,
    weights: WeightSource | None = None,
    block_sink: Callable[[int, nn.Module], None] | None = None,
    block_open: Callable[[int, nn.Module], None] | None = None,
    activations: ActivationStore | None = None,
) -> QuantizationReport:
    """Quantize a transformers causal LM in place; its block linears become quantized layers
    (:class:`QuantLinear` or the method's own layer format).

    Args:
        model: a model whose architecture :func:`quantlab.models.arch.resolve` knows.
        config: the method's configuration (``RTNConfig``, ``GPTQConfig``, ...; any method of
            :func:`quantlab.methods.methods`).
        tokenizer: needed by calibrated methods to tokenize the calibration text.
        calib: calibration options (defaults to :class:`CalibConfig`'s defaults).
        device: where blocks are processed (default: where the model is).
        samples: calibration token ids ``[S, L]`` to use instead of drawing ``calib``'s windows
            from its text source (then no tokenizer is needed).
        weights: streams ``model``'s weights from its checkpoint one block at a time (``model``
            then lives on the meta device, e.g. :class:`quantlab.export.lazy_model.LazyModel`);
            ``device`` must be given.
        block_sink: receives ``(index, block)`` once each block is quantized, before a streamed
            block leaves memory (a streaming export writes it there).
        block_open: receives ``(index, block)`` as each block is opened, before the method
            changes it (a baseline evaluation runs the float block there).
        activations: keeps the calibration activations between blocks in RAM up to a budget and
            spills the rest to disk (default: all in RAM).

    The report holds the seconds each block took and the run's peak host (and device) memory.
    """
    start = time.perf_counter()
    if device is None:
        if weights is not None:
            raise ValueError("a streamed model (weights=...) needs an explicit device")
        device = next(model.parameters()).device
    device = torch.device(device)
    calib = calib or CalibConfig()
    report = QuantizationReport(
        method=config.method,
        config=config.to_dict(),
        calib=calib.to_dict() if config.needs_calibration else None,
    )
    if samples is not None and config.needs_calibration:
        report.calib = {"source": "given token ids", "shape": list(samples.shape)}
    method = get_method(config.method)
    if not isinstance(config, method.config_cls):
        raise TypeError(
            f"method {config.method!r} expects a {method.config_cls.__name__}, got "
            f"{type(config).__name__}"
        )
    parallel = Parallel.current()
    if parallel.active and not method.runs_distributed:
        raise ValueError(
            f"method {config.method!r} does not run on several ranks yet ({parallel.world_size} "
            "were started): run it in a single process"
        )
    sequential = config.needs_calibration and method.captures_hessians_sequentially
    for wanted, option in (
        (calib.routing_weighted_hessians, "routing-weighted Hessians"),
        (calib.max_stage_bytes is not None, "a calibration stage memory limit"),
    ):
        if wanted and not sequential:
            raise ValueError(
                f"{option}: only methods that calibrate Hessians through the sequential capture "
                f"take it (gptq, fair-gptq, pvq, ternary with calibration); {config.method!r} "
                "with this configuration has none"
            )
    last = [start]

    def block_done(index: int, block: nn.Module) -> None:
        if block_sink is not None:
            block_sink(index, block)
        now = time.perf_counter()
        report.block_seconds.append(now - last[0])
        last[0] = now

    context = MethodContext(
        tokenizer,
        calib,
        report,
        device,
        progress and parallel.is_main,  # progress bars on rank 0 only
        given_samples=samples,
        weights=weights,
        block_sink=block_done,
        block_open=block_open,
        activations=activations,
        parallel=parallel,
    )
    # Fused experts (3-D parameters no linear hook sees) as one linear per expert projection.
    linearize(model)
    experts = routed_experts(model)
    for _, layer in experts:
        layer.calibrate_all = calib.calibrate_all_experts
        layer.weight_by_routing = calib.routing_weighted_hessians
    try:
        with PeakMemory(device) as peak:
            method.run(model, config, context)
    finally:
        for _, layer in experts:
            layer.calibrate_all = False
            layer.weight_by_routing = False
    if experts and config.needs_calibration:
        blocks_path = resolve(model, float_linears=False).blocks
        report.details["experts"] = coverage_summary(
            report.coverage,
            blocks_path,
            {
                path.removeprefix(blocks_path + ".").split(".", 1)[1]
                for path, _ in experts
                if path.startswith(blocks_path + ".")
            },
            calib.expert_min_tokens,
            calib.calibrate_all_experts,
            calib.routing_weighted_hessians,
        )
    report.peak_rss_bytes, report.peak_device_bytes = peak.rss_bytes, peak.device_bytes
    if parallel.active:
        report.details["parallel"] = _parallel_details(parallel, report)
    if activations is not None:
        report.details["activations"] = activations.stats()
    report.seconds = time.perf_counter() - start
    return report


_TRAFFIC_KINDS = ("reduce", "broadcast", "gather", "settle")


def _parallel_details(parallel: Parallel, report: QuantizationReport) -> dict[str, Any]:
    """Every rank's communication and solving, gathered onto every rank for the report: per
    rank the bytes it sent and received and the seconds it spent per kind of collective
    (:class:`quantlab.calib.parallel.Traffic`: waits for slower ranks included), and the seconds
    it spent solving the linears it owns."""
    traffic = parallel.traffic
    solve = sum(layer.seconds for layer in report.layers)
    mine = [solve] + [
        float(value)
        for kind in _TRAFFIC_KINDS
        for value in (
            traffic.bytes_out.get(kind, 0),
            traffic.bytes_in.get(kind, 0),
            traffic.seconds.get(kind, 0.0),
        )
    ]
    ranks = []
    for rank, values in enumerate(parallel.gather_floats(mine)):
        row: dict[str, Any] = {"rank": rank, "solve_seconds": values[0]}
        for i, kind in enumerate(_TRAFFIC_KINDS):
            out, into, seconds = values[1 + 3 * i : 4 + 3 * i]
            row[kind] = {"bytes_out": int(out), "bytes_in": int(into), "seconds": seconds}
        ranks.append(row)
    return {"world_size": parallel.world_size, "ranks": ranks}


def quantize_checkpoint(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: Any,
    tokenizer: Any = None,
    calib: CalibConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
    samples: torch.Tensor | None = None,
    export_format: str = "quantlab",
    eval_tokens: torch.Tensor | None = None,
    eval_seq_len: int = 2048,
    eval_windows: int | None = 10,
    baseline: bool = True,
    activation_budget: str | int | None = None,
    offload_dir: str | os.PathLike[str] | None = None,
    check_memory: bool = True,
) -> QuantizationReport:
    """Quantize the checkpoint in directory ``source`` into a checkpoint at ``out_dir`` (layout
    ``export_format``: quantlab, gptq or awq), one decoder block at a time: the model is built on
    the meta device, each block is read from the (memory-mapped, possibly sharded) safetensors
    files in ``dtype`` (default: the checkpoint's own) when it is processed, written to
    ``out_dir``'s shards once quantized, and
    released; the tensors no method touches (embedding, final norm, head) are copied in their
    stored dtype. Memory: about one block in ``dtype`` plus the calibration activations, whatever
    the model's size.

    With ``eval_tokens`` the run also measures perplexity (:class:`WindowStream`) over the first
    ``eval_windows`` windows of ``eval_seq_len`` tokens, in the same pass: the windows go through
    each float block as it is opened (the baseline, unless ``baseline`` is False) and through
    each quantized block before it is written (``report.ppl``), so the weights are read once.

    Memory is planned before anything runs (:func:`quantlab.memory_plan.plan_memory`: printed,
    and in ``report.details["memory_plan"]``); a run whose plan exceeds the host memory available
    is refused at the start with the figure (``check_memory=False`` runs it anyway). The
    calibration activations between blocks stay in RAM up to ``activation_budget`` (bytes or
    "8GB"; default: what the plan leaves of the available memory) and spill to files under
    ``offload_dir`` beyond it; without ``offload_dir`` they must fit the budget.

    The output is written atomically (the previous content of ``out_dir``, if quantlab wrote it,
    stays until the new checkpoint is complete); a disk without room for it
    (:func:`quantlab.export.save.estimate_checkpoint_bytes`) and methods that cannot stream
    (:func:`quantlab.methods.base.require_resident`) are refused at the start.
    """
    from transformers import AutoConfig

    from quantlab.eval.perplexity import WindowStream
    from quantlab.export.checkpoint_files import parse_size
    from quantlab.export.fp8_source import open_source_checkpoint, source_reading_notes
    from quantlab.export.lazy_model import LazyModel, empty_model
    from quantlab.export.model_source import checkpoint_dtype
    from quantlab.export.output_guard import check_free_space
    from quantlab.export.save import check_exportable, checkpoint_layout, estimate_checkpoint_bytes
    from quantlab.export.streaming import StreamingCheckpoint
    from quantlab.memory_plan import plan_memory
    from quantlab.models.arch import resolve
    from quantlab.resources import available_memory_bytes, free_device_memory_bytes

    check_exportable(config, export_format)
    # Several ranks (torchrun): every rank streams the blocks and calibrates on its share; rank 0
    # alone writes the checkpoint, evaluates and prints.
    parallel = Parallel.current()
    main = parallel.is_main
    progress = progress and main
    shard_bytes = parse_size(max_shard_size)
    device = torch.device(device)
    dtype = dtype or checkpoint_dtype(source, device)
    files = open_source_checkpoint(source)
    lazy = LazyModel(empty_model(AutoConfig.from_pretrained(source), dtype), files, device)
    source_notes = source_reading_notes(files, lazy.dropped)
    if main:
        for line in source_notes.get("said", []):
            print(f"quantlab: {line}", file=sys.stderr)
    spec = resolve(lazy.model)
    # Before hours of quantization: a disk that cannot take the result fails now.
    if main:
        check_free_space(out_dir, estimate_checkpoint_bytes(files, lazy.model, config, tokenizer))
    calib = calib or CalibConfig()
    n_samples, seq_len = (
        tuple(samples.shape)
        if samples is not None
        else (
            calib.n_samples,
            calib.seq_len,
        )
    )
    windows = 0
    if eval_tokens is not None:
        windows = eval_tokens.numel() // eval_seq_len
        windows = windows if eval_windows is None else min(windows, eval_windows)
    budget = (
        None if activation_budget is None else parse_size(activation_budget, "activation budget")
    )
    # Per rank: its share of the windows, and its part of the host memory it shares with the
    # other ranks on its node (torchrun's LOCAL_WORLD_SIZE); rank 0 alone evaluates.
    available = available_memory_bytes()
    if parallel.active:
        calibrated = bool(getattr(config, "needs_calibration", False))
        if calibrated:
            parallel.share(n_samples)  # refuses fewer windows than ranks, here at the start
            # The largest share any rank takes (methods split their windows differently: AWQ
            # shares its scored windows and the others apart).
            n_samples = -(-n_samples // parallel.world_size)
        if available is not None:
            available //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        windows = windows if main else 0
    plan = plan_memory(
        lazy.model, spec, config, n_samples, seq_len, calib.batch_size, dtype, windows,
        eval_seq_len, budget, offload_dir is not None, available, device.type,
        free_device_memory_bytes(device), calib.max_stage_bytes,
    )  # fmt: skip
    if progress:
        print(f"quantlab: memory plan: {plan.describe()}", file=sys.stderr)
    if budget is not None and offload_dir is None and plan.activations > budget:
        raise MemoryError(
            f"the activations between blocks (calibration and evaluation windows) need "
            f"{plan.activations / 2**30:.2f} GiB, more than the "
            f"{budget / 2**30:.2f} GiB activation budget; give an offload directory to spill the "
            "rest to disk, or raise the budget"
        )
    if check_memory and not plan.fits():
        raise MemoryError(
            f"this run {plan.describe()}: it does not fit. Lower the calibration batch size "
            "(forward), compute in bfloat16 (halves block, activations and forward), give an "
            "offload directory for the activations, or limit the Hessians one calibration pass "
            "gathers (--max-stage-memory: a mixture's experts in several passes); "
            "check_memory=False (--no-memory-check) runs it anyway"
        )
    store = ActivationStore(plan.activation_budget if offload_dir else budget, offload_dir)
    blocks = ModelBlocks(
        lazy.model, spec.blocks, device, lazy, skip_for_capture=(spec.final_norm, spec.lm_head)
    )
    after = before = None
    if eval_tokens is not None and main:
        after = WindowStream(eval_tokens, eval_seq_len, eval_windows, store=store)
        before = (
            WindowStream(eval_tokens, eval_seq_len, eval_windows, store=store) if baseline else None
        )
        with blocks.outside_on_device():
            for stream in (after, before):
                if stream is not None:
                    stream.start(lazy.model, blocks.blocks, device)
    layout = checkpoint_layout(export_format, config)
    whole_model = get_method(config.method).whole_model_reason(config)
    writer = (
        StreamingCheckpoint(
            out_dir, files, spec.blocks, layout, shard_bytes, inputs=(Path(source),)
        )
        if main
        else contextlib.nullcontext(None)
    )
    with store, writer as out:

        def block_done(index: int, block: nn.Module) -> None:
            if after is not None:
                after.advance(index, block, device)
            if out is not None:
                out.write_block(index, block)

        def block_open(index: int, block: nn.Module) -> None:
            if before is not None:
                before.advance(index, block, device)

        if whole_model is None:
            report = quantize_model(
                lazy.model,
                config,
                tokenizer,
                calib,
                device,
                progress,
                samples,
                weights=lazy,
                block_sink=block_done,
                block_open=block_open,
                activations=store,
            )
        else:
            # Stated, not silent: the summary and the report say the model was held whole.
            if progress:
                gib = files.resident_bytes(dtype) / 2**30
                name = str(dtype).removeprefix("torch.")
                print(
                    f"quantlab: the whole model ({gib:.1f} GiB in {name}) is held in memory: "
                    f"{whole_model}",
                    file=sys.stderr,
                )
            lazy.load()
            report = quantize_model(
                lazy.model, config, tokenizer, calib, device, progress, samples,
                block_open=block_open, activations=store,
            )  # fmt: skip
            # Every block is final only now (a whole-model step may revisit earlier blocks).
            for index, block in enumerate(blocks.blocks):
                block_done(index, block)
            lazy.release()
            report.details["whole_model"] = whole_model
        if after is not None:
            with blocks.outside_on_device(with_head=True):
                report.ppl = after.finish(lazy.model, blocks.blocks, device).to_dict()
                if before is not None:
                    report.ppl_baseline = before.finish(lazy.model, blocks.blocks, device).to_dict()
        report.details["memory_plan"] = plan.to_dict()
        report.details["storage"] = _linear_storage(lazy.model, files)
        if source_notes:
            report.details["source"] = source_notes
        if out is not None:
            report.details["export"] = {"format": out.describe(lazy.model)}
            out.finish(lazy.model, tokenizer, report.to_dict())
    files.close()
    return report


def _linear_storage(model: nn.Module, files: Any) -> dict[str, int]:
    """Stored bits and weight count of the quantized linears, and the bytes their float weights
    had in the source checkpoint ``files``."""
    from quantlab.nn.registry import quantized_modules, quantized_storage

    bits, weights = quantized_storage(model)
    source_bytes = 0
    for name, _ in quantized_modules(model):
        info = files.tensors.get(f"{name}.weight")
        source_bytes += 0 if info is None else info.nbytes()
    return {"linear_bits": bits, "linear_weights": weights, "source_linear_bytes": source_bytes}


@torch.no_grad()
def replace_linear(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 64,
    sym: bool = False,
    scale_dtype: str = "float16",
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = ("lm_head",),
) -> list[str]:
    """Swap every matching ``nn.Linear`` of any torch model for an RTN-quantized
    :class:`QuantLinear`.

    Names are matched with shell-style patterns against the module's dotted path. Layers whose
    ``in_features`` the group size does not divide raise ``ValueError`` (exclude them or pick
    another group size). A mixture's experts (``RoutedExperts``) whose projections all end up
    quantized run as one grouped op per projection afterwards
    (:func:`quantlab.nn.groupwise_int_experts.stack_groupwise_experts`). Returns the names of
    the replaced modules.
    """
    config = RTNConfig(bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype)
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(fnmatch.fnmatch(name, p) for p in include)
        and not excluded(name, exclude)
    ]
    for name in targets:
        linear = model.get_submodule(name)
        result = rtn_quantize(
            linear.weight, bits, group_size, sym, dtype_from_name(scale_dtype), name=name
        )
        set_submodule(model, name, packed_layer(result, linear, config, name))
    stack_groupwise_experts(model)
    return targets
