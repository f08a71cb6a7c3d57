"""Sequential, block-by-block activation capture.

The first decoder block's inputs are caught once (the model runs only as far as block 0). Then each
block is processed alone: hooks on its linears feed
:class:`~quantlab.calib.stats.HessianAccumulator` statistics to a caller-supplied ``on_group``
callback (which quantizes those linears in place), and the block is replayed with its *quantized*
weights to produce the next block's inputs. Peak memory is one block plus the calibration
activations, which can live on an offload device.

A *sequential group* is a set of linears that read the same input tensor (q/k/v, gate/up). Groups
are solved in forward order ("true sequential"), so each group's statistics see the
already-quantized groups before it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlab.calib.activations import Activation, ActivationStore, materialize
from quantlab.calib.blocks import ModelBlocks
from quantlab.calib.parallel import Parallel
from quantlab.calib.stats import ROW_WEIGHTS_ATTRIBUTE, HessianAccumulator

__all__ = [
    "BlockInputs",
    "GroupCoverage",
    "Stages",
    "ModuleCall",
    "run_block_with_taps",
    "GroupCallback",
    "capture_block_inputs",
    "move_to",
    "run_block",
    "run_block_until",
    "run_sequential",
    "settle_coverage",
    "split_stage",
    "stage_parts",
]

IDENTITY_HESSIAN = "identity Hessian: the method's data-free rounding"

GroupCallback = Callable[[int, nn.Module, Sequence[str], dict[str, HessianAccumulator]], None]

# A block's sequential groups as calibration stages (the groups of one stage read inputs none of
# them produces, so one pass gathers all their statistics): a function of the block (a mixture of
# experts expands to one group per expert), or one fixed list of groups, each its own stage.
Stages = Sequence[Sequence[str]] | Callable[[nn.Module], Sequence[Sequence[Sequence[str]]]]


@dataclass
class GroupCoverage:
    """How many calibration tokens reached one sequential group's input.

    Attributes:
        block: the block's index.
        names: the group's linears (paths inside the block).
        tokens: tokens over every rank (fewer than ``block_tokens`` for a routed expert).
        block_tokens: tokens that entered the block, over every rank.
        white: too few tokens: the method did without this input's statistics.
        fallback: what it did instead (``""`` where it did not fall back).
    """

    block: int
    names: tuple[str, ...]
    tokens: int
    block_tokens: int
    white: bool
    fallback: str = ""


def settle_coverage(
    index: int,
    groups: Sequence[Sequence[str]],
    stats: Sequence[dict[str, HessianAccumulator]],
    block_tokens: int,
    min_tokens: int,
    parallel: Parallel | None,
    coverage: list[GroupCoverage] | None,
) -> None:
    """Before the groups of one stage are solved: count the tokens that reached each group's
    input over every rank (one small gather), switch a group that a router fed fewer than
    ``min_tokens`` tokens (``tokens < min(min_tokens, block_tokens)``: a group every token
    reaches never falls back) to the identity Hessian, and record it all in ``coverage``."""
    local = [float(each[group[0]].n_tokens) for group, each in zip(groups, stats, strict=True)]
    local.append(float(block_tokens))
    if parallel is not None and parallel.active:
        totals = [sum(column) for column in zip(*parallel.gather_floats(local), strict=True)]
    else:
        totals = local
    block_total = int(totals[-1])
    for group, group_stats, tokens in zip(groups, stats, totals[:-1], strict=True):
        white = int(tokens) < min(min_tokens, block_total)
        if white:
            group_stats[group[0]].assume_white()
        if coverage is not None:
            coverage.append(
                GroupCoverage(
                    index, tuple(group), int(tokens), block_total, white,
                    IDENTITY_HESSIAN if white else "",
                )
            )  # fmt: skip


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the wanted inputs are captured."""


@dataclass
class BlockInputs:
    """The inputs of one decoder block for every calibration batch.

    Attributes:
        hidden: per batch, ``[b, L, D]`` hidden states (on the storage device, or spilled to
            disk by ``store``: read them through :meth:`batch` / :meth:`batches`).
        kwargs: per batch, the keyword arguments the model passed to the block (attention mask,
            rotary position embeddings, ...), on the storage device.
        store: where a block's outputs computed from these inputs are kept
            (:class:`~quantlab.calib.activations.ActivationStore`: RAM up to a budget, then
            disk); ``None``: where the inputs are.
    """

    hidden: list[Activation] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    store: ActivationStore | None = None

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def __len__(self) -> int:
        return len(self.hidden)

    def batch(self, index: int) -> torch.Tensor:
        """Batch ``index``'s hidden states (read back if spilled)."""
        return materialize(self.hidden[index])

    def batches(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """``(hidden, kwargs)`` per batch, each read back only when it is reached."""
        for index, kwargs in enumerate(self.kwargs):
            yield self.batch(index), kwargs

    def keep(self, output: torch.Tensor, like: torch.Tensor) -> Activation:
        """Store a block output computed from a batch ``like``: in ``store``, or where ``like``
        is."""
        return self.store.put(output) if self.store is not None else output.to(like.device)

    def with_hidden(self, hidden: list[Activation]) -> BlockInputs:
        """The next block's inputs: ``hidden`` with these keyword arguments and store."""
        return BlockInputs(hidden=hidden, kwargs=self.kwargs, store=self.store)


def move_to(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def _block_output(out: Any) -> torch.Tensor:
    # transformers 5 blocks return the hidden states; 4.x returns a tuple headed by them.
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    samples: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    storage_device: torch.device | str = "cpu",
    store: ActivationStore | None = None,
) -> BlockInputs:
    """Run the model on ``samples`` ``[S, L]`` only as far as ``blocks[0]`` and keep its inputs
    (in ``store`` when given, which then keeps every later block's outputs too; else on
    ``storage_device``)."""
    captured = BlockInputs(store=store)

    def catch(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(store.put(hidden) if store else hidden.to(storage_device))
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["use_cache"] = False
        kw["past_key_values"] = None
        captured.kwargs.append(move_to(kw, storage_device))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, samples.shape[0], batch_size):
            batch = samples[start : start + batch_size].to(device)
            with contextlib.suppress(_StopForward):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    if len(captured.hidden) == 0:
        raise RuntimeError("the first decoder block was never called; cannot capture its inputs")
    return captured


@torch.no_grad()
def run_block(
    block: nn.Module, inputs: BlockInputs, device: torch.device | str
) -> list[Activation]:
    """Outputs of ``block`` for every batch of ``inputs`` (kept as :meth:`BlockInputs.keep`
    says)."""
    outs = []
    for hidden, kwargs in inputs.batches():
        out = _block_output(block(hidden.to(device), **move_to(kwargs, device)))
        outs.append(inputs.keep(out, hidden))
    return outs


@dataclass
class ModuleCall:
    """One call of a submodule inside a block, kept so the submodule can be re-run alone.

    Attributes:
        hidden: its main input (first positional argument or ``hidden_states``).
        args: the remaining positional arguments.
        kwargs: the keyword arguments (attention mask, rotary embeddings, ...).
        as_keyword: ``hidden`` was passed as ``hidden_states=``.
    """

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    as_keyword: bool

    def replay(self, module: nn.Module) -> torch.Tensor:
        if self.as_keyword:
            out = module(*self.args, hidden_states=self.hidden, **self.kwargs)
        else:
            out = module(self.hidden, *self.args, **self.kwargs)
        return _block_output(out)


@torch.no_grad()
def run_block_with_taps(
    block: nn.Module,
    inputs: BlockInputs,
    device: torch.device | str,
    taps: dict[str, Callable[[torch.Tensor], None]],
    record: Sequence[str] = (),
    record_batches: int = 1,
) -> tuple[list[torch.Tensor], dict[str, list[ModuleCall]]]:
    """Run ``block`` on every batch, feeding submodules' inputs to ``taps`` and keeping calls.

    Args:
        taps: submodule path -> callback receiving that submodule's input on every batch.
        record: submodule paths whose calls (input and arguments) are kept, on ``device``, for
            the first ``record_batches`` batches.

    Returns:
        The block outputs per batch (stored where the inputs are) and the recorded calls.
    """
    calls: dict[str, list[ModuleCall]] = {name: [] for name in record}
    batch = 0

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            as_keyword = not args
            hidden = kwargs["hidden_states"] if as_keyword else args[0]
            if name in taps:
                taps[name](hidden)
            if name in calls and batch < record_batches:
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                calls[name].append(ModuleCall(hidden, tuple(args[1:]), rest, as_keyword))

        return hook

    handles = [
        block.get_submodule(name).register_forward_pre_hook(make_hook(name), with_kwargs=True)
        for name in dict.fromkeys([*taps, *record])
    ]
    outs = []
    try:
        for hidden, kwargs in inputs.batches():
            out = _block_output(block(hidden.to(device), **move_to(kwargs, device)))
            outs.append(inputs.keep(out, hidden))
            batch += 1
    finally:
        for h in handles:
            h.remove()
    return outs, calls


@torch.no_grad()
def run_block_until(
    block: nn.Module, inputs: BlockInputs, device: torch.device | str, name: str
) -> list[torch.Tensor]:
    """The input of submodule ``name`` of ``block`` for every batch of ``inputs``, on ``device``.

    Each forward pass stops as soon as ``name`` is reached, so the rest of the block is not run.
    """
    caught: list[torch.Tensor] = []

    def catch(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        caught.append(args[0] if args else kwargs["hidden_states"])
        raise _StopForward

    handle = block.get_submodule(name).register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for hidden, kwargs in inputs.batches():
            with contextlib.suppress(_StopForward):
                block(hidden.to(device), **move_to(kwargs, device))
    finally:
        handle.remove()
    if len(caught) != len(inputs.hidden):
        raise RuntimeError(f"{name} was not called on every batch of the block's forward pass")
    return caught


def _hook_group(
    block: nn.Module,
    group: Sequence[str],
    stats: dict[str, HessianAccumulator],
    after: Callable[[], None] | None,
    paused: Callable[[], bool] | None = None,
) -> torch.utils.hooks.RemovableHandle:
    """Feed the group's shared input to its accumulator, then call ``after``.

    While ``paused()`` is true the hook does nothing: forward passes that ``on_group`` itself runs
    (statistics of other inputs, such as Fair-GPTQ's sentence pairs) must not count.
    """
    first = block.get_submodule(group[0])

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if paused is not None and paused():
            return
        # Members share one accumulator (same input). Rows may carry weights (a routed expert's
        # routing weights, while affinity-weighted calibration runs).
        stats[group[0]].add(args[0], getattr(module, ROW_WEIGHTS_ATTRIBUTE, None))
        if after is not None:
            after()

    return first.register_forward_pre_hook(pre_hook)


def _new_stats(
    block: nn.Module, group: Sequence[str], device: torch.device | str
) -> dict[str, HessianAccumulator]:
    """Statistics for one sequential group: a single accumulator mapped to every member.

    Members read the same input, so one ``X^T X`` serves them all (for q/k/v, a third of the work).
    """
    widths = set()
    for name in group:
        linear = block.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is {type(linear).__name__}, expected nn.Linear")
        widths.add(linear.in_features)
    if len(widths) != 1:
        raise ValueError(f"sequential group {list(group)} mixes input widths {sorted(widths)}")
    shared = HessianAccumulator(widths.pop(), device)
    return dict.fromkeys(group, shared)


def _release(stats: dict[str, HessianAccumulator]) -> None:
    """A solved group's Hessian is not needed again: free it before the next group's solve (the
    hooks and closures that keep the accumulator would otherwise keep every K x K of the block)."""
    for accumulator in stats.values():
        accumulator.release()


@torch.no_grad()
def _process_block_single_pass(
    index: int,
    block: nn.Module,
    groups: Sequence[Sequence[str]],
    inputs: BlockInputs,
    device: torch.device | str,
    on_group: GroupCallback,
) -> list[torch.Tensor]:
    """One batch: solve each group inside the forward pass, just before its first linear runs.

    With a single batch, a group's statistics are complete as soon as its input tensor exists, so
    the group can be quantized in its forward pre-hook and the rest of the same forward pass already
    runs on quantized weights: one forward per block yields both the true-sequential statistics and
    the quantized replay.
    """
    handles = []
    solving = [False]
    for group in groups:
        stats = _new_stats(block, group, device)

        def solve(
            group: Sequence[str] = group, stats: dict[str, HessianAccumulator] = stats
        ) -> None:
            solving[0] = True
            try:
                on_group(index, block, group, stats)
            finally:
                solving[0] = False
                _release(stats)

        handles.append(_hook_group(block, group, stats, solve, paused=lambda: solving[0]))
    try:
        return run_block(block, inputs, device)
    finally:
        for h in handles:
            h.remove()


def stage_parts(widths: Sequence[int], max_bytes: int | None) -> list[list[int]]:
    """The indices of a stage's groups (their inputs ``widths``) in consecutive parts whose fp32
    ``K x K`` Hessians together take at most ``max_bytes`` (a part holds one group at least,
    however wide). ``None``: one part."""
    if max_bytes is None:
        return [list(range(len(widths)))]
    parts: list[list[int]] = []
    used = 0
    for index, width in enumerate(widths):
        size = 4 * width * width
        if parts and used + size <= max_bytes:
            parts[-1].append(index)
            used += size
        else:
            parts.append([index])
            used = size
    return parts


def split_stage(
    block: nn.Module, stage: Sequence[Sequence[str]], max_bytes: int | None
) -> list[list[Sequence[str]]]:
    """``stage``'s groups in the parts of :func:`stage_parts`: one calibration pass gathers one
    part's statistics."""
    widths = [block.get_submodule(group[0]).in_features for group in stage]
    return [[stage[i] for i in part] for part in stage_parts(widths, max_bytes)]


@torch.no_grad()
def _process_block_staged(
    index: int,
    block: nn.Module,
    stages: Sequence[Sequence[Sequence[str]]],
    inputs: BlockInputs,
    device: torch.device | str,
    on_group: GroupCallback,
    true_sequential: bool,
    min_tokens: int = 0,
    parallel: Parallel | None = None,
    coverage: list[GroupCoverage] | None = None,
    max_stage_bytes: int | None = None,
) -> list[torch.Tensor]:
    """Several batches (or a stage of several groups): one pass per stage to gather statistics
    (truncated at the input of a single-group stage), then a full replay. Without
    ``true_sequential`` one pass gathers every stage. A stage whose Hessians exceed
    ``max_stage_bytes`` runs as several passes (:func:`split_stage`): with ``true_sequential`` its
    groups read inputs no group of the stage writes, so the parts see what one pass would;
    without, a later part sees the earlier parts quantized."""
    if not true_sequential:
        stages = [[group for stage in stages for group in stage]]
    stages = [part for stage in stages for part in split_stage(block, stage, max_stage_bytes)]
    for stage in stages:
        all_stats = [_new_stats(block, group, device) for group in stage]
        # A stage of one group can end the pass at its input; with several (the experts), some
        # may never be reached, so the pass runs to the end.
        stop_early = true_sequential and len(stage) == 1

        def stop() -> None:
            raise _StopForward

        handles = [
            _hook_group(block, group, stats, stop if stop_early else None)
            for group, stats in zip(stage, all_stats, strict=True)
        ]
        try:
            for hidden, kwargs in inputs.batches():
                with contextlib.suppress(_StopForward):
                    block(hidden.to(device), **move_to(kwargs, device))
        finally:
            for h in handles:
                h.remove()
        settle_coverage(index, stage, all_stats, inputs.n_tokens, min_tokens, parallel, coverage)
        for group, stats in zip(stage, all_stats, strict=True):
            on_group(index, block, group, stats)
            _release(stats)
    return run_block(block, inputs, device)


@torch.no_grad()
def run_sequential(
    blocks: ModelBlocks,
    stages: Stages,
    samples: torch.Tensor,
    on_group: GroupCallback,
    on_block_done: Callable[[int, nn.Module], None] | None = None,
    batch_size: int | None = None,
    storage_device: torch.device | str = "cpu",
    true_sequential: bool = True,
    progress: bool = True,
    on_start: Callable[[], None] | None = None,
    on_block_start: Callable[[int, nn.Module], None] | None = None,
    parallel: Parallel | None = None,
    min_tokens: int = 0,
    coverage: list[GroupCoverage] | None = None,
    max_stage_bytes: int | None = None,
) -> None:
    """Quantize ``blocks`` one after another on calibration ``samples`` ``[S, L]``.

    ``stages`` (:data:`Stages`): the block's sequential groups, in calibration stages. A group
    (a routed expert) that fewer than ``min_tokens`` tokens reach is solved with an identity
    Hessian (:func:`settle_coverage`); ``coverage`` receives every group's token count. A stage
    whose groups' Hessians together exceed ``max_stage_bytes`` (a large mixture's experts:
    DeepSeek-V3's 256 gate/up Hessians take 52 GiB) gathers them in several passes over the
    block, each within the budget.

    For each block, ``on_group(block_index, block, group_names, stats)`` is called once per
    sequential group and must quantize those linears in place (their weights replaced by the
    quantized values); then the block is replayed to produce the next block's inputs, and
    ``on_block_done`` is called (e.g. to swap the linears for packed modules) before the block is
    closed (:meth:`ModelBlocks.open`: moved back, or streamed out). ``on_group`` may itself run
    ``block`` on other inputs (e.g. with :func:`run_block_until`); the statistics hooks ignore
    those passes.

    ``on_start()`` runs once after the capture while the modules outside the blocks are still on
    the device (to catch the first block's inputs of other sequences); ``on_block_start(index,
    block)`` runs once a block is open, before its first group (to transform its float weights,
    as AWQ's smoothing does ahead of GPTQ).

    ``batch_size`` defaults to all samples in one batch, which enables the single-pass mode.

    ``parallel`` (a multi-process run): this rank calibrates on its share of ``samples`` only
    (:meth:`Parallel.share`; ``batch_size`` then applies to the share), and ``on_group`` gets the
    statistics of this rank's tokens, to reduce where they are needed
    (:meth:`HessianAccumulator.reduce_to_owners`).
    """
    if parallel is not None:
        samples = samples[parallel.share(samples.shape[0])]
    n = samples.shape[0]
    batch_size = n if batch_size is None else max(1, min(batch_size, n))
    device = blocks.device
    with blocks.outside_on_device():
        inputs = capture_block_inputs(
            blocks.model, blocks.blocks, samples, batch_size, device, storage_device,
            blocks.activations,
        )  # fmt: skip
        if on_start is not None:
            on_start()
    for index in tqdm(range(len(blocks)), desc="blocks", disable=not progress):
        with blocks.open(index) as block:
            if on_block_start is not None:
                on_block_start(index, block)
            block_stages = stages(block) if callable(stages) else [[group] for group in stages]
            # One batch solves each group inside the forward pass -- but only where every group
            # is surely reached (no routed experts, which some ranks' tokens may miss).
            single_pass = (
                len(inputs) == 1
                and true_sequential
                and all(len(stage) == 1 for stage in block_stages)
            )
            if single_pass:
                groups = [stage[0] for stage in block_stages]
                # (Every token reaches every group: nothing for ``coverage`` to tell.)
                outs = _process_block_single_pass(index, block, groups, inputs, device, on_group)
            else:
                outs = _process_block_staged(
                    index, block, block_stages, inputs, device, on_group, true_sequential,
                    min_tokens, parallel, coverage, max_stage_bytes,
                )  # fmt: skip
            if on_block_done is not None:
                on_block_done(index, block)
        inputs = inputs.with_hidden(outs)
