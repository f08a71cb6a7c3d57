"""The memory plan of a streamed run: its parts computed from the shapes, printed at the start,
and a run that does not fit refused before any block is read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig

from quantlab.config import CalibConfig
from quantlab.export.lazy_model import empty_model
from quantlab.memory_plan import PROCESS_BYTES, plan_memory
from quantlab.methods.registry import config_from_dict
from quantlab.models.arch import resolve
from quantlab.pipeline import quantize_checkpoint
from tests.families import tiny_model

GPTQ = {"method": "gptq", "bits": 4, "group_size": 64}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(path)
    return path


def _skeleton(model_dir: Path) -> torch.nn.Module:
    return empty_model(AutoConfig.from_pretrained(model_dir))


def test_the_parts_follow_from_the_shapes(model_dir: Path) -> None:
    model = _skeleton(model_dir)
    spec = resolve(model)
    # tiny llama: hidden 128, intermediate 256, vocab 256, untied head; 4 x 32 tokens, fp32.
    plan = plan_memory(model, spec, config_from_dict(GPTQ), 4, 32, 2, torch.float32, 2, 16)
    block_params = 4 * 128 * 128 + 3 * 128 * 256 + 2 * 128
    assert plan.block_weights == 4 * block_params + 3 * 4 * 128 * 256
    # GPTQ: the Hessian of the group being solved (down's, 256 wide, is the widest; each is freed
    # once solved) and the solver's one working copy.
    assert plan.solver == 4 * 256**2 + 4 * 256**2
    assert plan.forward == max(2 * 32, 16) * (3 * 256 + 6 * 128) * 4
    # Calibration (block inputs and outputs) and evaluation windows (baseline and result, inputs
    # and outputs) are the activations held between blocks, in RAM without an offload directory.
    assert plan.evaluation == 4 * 2 * 16 * 128 * 4
    assert plan.activations == plan.activations_in_ram == 2 * 4 * 32 * 128 * 4 + plan.evaluation
    # Embedding and (untied) head at the end of the evaluation, with one window's logits.
    assert plan.outside == 2 * 256 * 128 * 4 + 2 * 16 * 256 * 4
    # The block and the embedding/head are held one after the other; the rest throughout.
    block_phase = plan.block_weights + plan.solver + plan.forward
    held = PROCESS_BYTES + plan.activations
    assert plan.total == held + max(block_phase, plan.outside)
    # Without true-sequential groups every group's Hessian is gathered before the first solve;
    # the other second-order solvers hold every group's and ~3.5 K x K more of the widest.
    flat = plan_memory(
        model, spec, config_from_dict({**GPTQ, "true_sequential": False}), 4, 32, 2, torch.float32
    )
    assert flat.solver == 4 * (3 * 128**2 + 256**2) + 4 * 256**2
    pvq = plan_memory(model, spec, config_from_dict({"method": "pvq"}), 4, 32, 2, torch.float32)
    assert pvq.solver == 4 * (3 * 128**2 + 256**2) + 14 * 256**2
    # RTN needs no calibration: no Hessians, no activations.
    rtn = plan_memory(model, spec, config_from_dict({"method": "rtn"}), 4, 32, None, torch.float32)
    assert rtn.solver == rtn.activations == 0
    # bf16 halves what is held in the compute dtype; without an evaluation no head is loaded.
    half = plan_memory(model, spec, config_from_dict(GPTQ), 4, 32, 2, torch.bfloat16)
    assert half.activations * 2 == plan.activations - plan.evaluation
    assert half.outside * 2 == 256 * 128 * 4


def test_with_an_offload_directory_the_activations_spill_what_memory_lacks(
    model_dir: Path,
) -> None:
    model = _skeleton(model_dir)
    spec = resolve(model)
    config = config_from_dict(GPTQ)
    roomy = plan_memory(model, spec, config, 64, 256, 8, torch.float32, available=64 << 30)
    assert roomy.spilled == 0 and roomy.fits()
    need = roomy.total - roomy.activations  # everything but the activations
    tight = plan_memory(
        model, spec, config, 64, 256, 8, torch.float32, offload=True,
        available=int((need + roomy.activations // 2) / 0.9),
    )  # fmt: skip
    assert 0 < tight.spilled < tight.activations and tight.fits()
    assert "spill to the offload directory" in tight.describe()


def test_on_a_gpu_the_block_is_planned_against_the_device(model_dir: Path) -> None:
    """On a GPU the block, solver and forward are device memory; the host keeps the process, the
    activations (stored on the host) and one part's tensors on their way to the device."""
    model = _skeleton(model_dir)
    spec = resolve(model)
    config = config_from_dict(GPTQ)
    on_cpu = plan_memory(model, spec, config, 4, 32, 2, torch.float32, 2, 16)
    block_phase = on_cpu.block_weights + on_cpu.solver + on_cpu.forward
    gpu = plan_memory(
        model, spec, config, 4, 32, 2, torch.float32, 2, 16, device="cuda",
        device_available=block_phase,
    )  # fmt: skip
    assert on_cpu.device_total == 0 and gpu.device_total == max(block_phase, gpu.outside)
    held = PROCESS_BYTES + gpu.activations
    assert gpu.total == held + max(gpu.block_weights, gpu.outside)
    assert gpu.fits() and "on cuda about" in gpu.describe()
    short = plan_memory(
        model, spec, config, 4, 32, 2, torch.float32, 2, 16, device="cuda",
        device_available=block_phase - 1,
    )  # fmt: skip
    assert not short.fits() and "free)" in short.describe()
    assert short.to_dict()["device_total"] == block_phase


def _quantize(model_dir: Path, out: Path, progress: bool = False, **kw: Any) -> Any:
    samples = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    calib = CalibConfig(n_samples=4, seq_len=32)
    config = config_from_dict(GPTQ)
    return quantize_checkpoint(
        model_dir, out, config, calib=calib, samples=samples, progress=progress, **kw
    )


def _refuse(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> str:
    def load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a block was read before the refusal")

    monkeypatch.setattr("quantlab.export.lazy_model.LazyModel.load", load)
    with pytest.raises(MemoryError) as info:
        _quantize(model_dir, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()
    return str(info.value)


def test_a_run_that_does_not_fit_is_refused_at_the_start(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("quantlab.resources.available_memory_bytes", lambda: 1 << 30)
    message = _refuse(model_dir, tmp_path, monkeypatch)
    assert "needs about 1.5" in message and "1.00 GiB available" in message
    assert "does not fit" in message and "--no-memory-check" in message


def test_activations_past_the_budget_without_an_offload_directory_are_refused(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _refuse(model_dir, tmp_path, monkeypatch, activation_budget="1KB")
    assert "need 0.00 GiB, more than the 0.00 GiB activation budget" in message


_CHILD = """
import json, sys, torch
from quantlab.config import CalibConfig
from quantlab.methods.registry import config_from_dict
from quantlab.pipeline import quantize_checkpoint
samples = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
report = quantize_checkpoint(
    sys.argv[1], sys.argv[2], config_from_dict({"method": "gptq", "bits": 4, "group_size": 64}),
    calib=CalibConfig(n_samples=4, seq_len=32), samples=samples, progress=True,
)
print(json.dumps({"peak": report.peak_rss_bytes, "plan": report.details["memory_plan"]}))
"""


def test_the_plan_is_printed_and_bounds_a_fresh_processs_peak(
    model_dir: Path, tmp_path: Path
) -> None:
    """In a process of its own (the plan's process allowance is for one), the run's peak RSS is
    within its plan, which was printed at the start."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(model_dir), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "quantlab: memory plan: needs about" in done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < result["peak"] <= result["plan"]["total"]


def _peak_torch_allocation(run: Callable[[], object]) -> int:
    """The most bytes torch held at once during ``run()`` beyond what it held before, from the
    profiler's allocation and free events (exact; RSS moves with the C allocator's caching)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as profiler:
        run()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert events, "the profiler recorded no allocation: the measurement would be empty"
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("clip_search", [True, False])
def test_the_solver_term_bounds_gptqs_own_peak(act_order: bool, clip_search: bool) -> None:
    """The plan's solver allowance beyond the Hessian the caller holds (one K x K fp32: the
    damped copy, factored and inverted in place) and the block's three fp32 copies of the weight
    cover what gptq_quantize allocates at its peak (before this bound: ~3.5 K x K more, measured
    3.1-3.5 at K = 6144). A down projection's shape ratio (N < K) so the weight copies count."""
    from quantlab.solvers.gptq import gptq_quantize

    k, n = 2048, 768
    x = torch.randn(4096, k, generator=torch.Generator().manual_seed(0))
    hessian = x.T @ x / 4096
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    del x
    peak = _peak_torch_allocation(
        lambda: gptq_quantize(
            weight, hessian, 4, 64, False, act_order=act_order, clip_search=clip_search
        )
    )
    assert 4 * k * k < peak <= 4 * k * k + 3 * 4 * n * k, (peak / (4 * k * k), act_order)


def test_a_mixture_plans_every_expert_hessian_of_a_stage_at_once() -> None:
    """Every expert's gate/up statistics are gathered in one pass, so GPTQ holds all of the
    stage's Hessians together: 8 experts x 128^2 in the MoE block, more than any single group
    (the dense first block's down, 256 wide, is the widest input)."""
    from quantlab.models.arch import linearize
    from tests.families import tiny_moe_model

    model = tiny_moe_model("qwen3_moe")
    linearize(model)
    spec = resolve(model)
    plan = plan_memory(model, spec, config_from_dict(GPTQ), 4, 32, 2, torch.float32)
    assert plan.solver == 4 * 8 * 128**2 + 4 * 256**2
    # Every group of every stage, for the solvers that keep them all (the MoE block's layout:
    # q/k/v, o, 8 experts' gate/up, 8 experts' down).
    pvq = plan_memory(model, spec, config_from_dict({"method": "pvq"}), 4, 32, 2, torch.float32)
    assert pvq.solver == 4 * (2 * 128**2 + 8 * 128**2 + 8 * 64**2) + 14 * 256**2
    # A stage limit of three 128-wide Hessians: the gate/up stage in passes of 3, 3 and 2
    # experts, so GPTQ holds three at a time (the dense block's 256-wide down is still one group).
    limited = plan_memory(
        model, spec, config_from_dict(GPTQ), 4, 32, 2, torch.float32,
        max_stage_bytes=3 * 4 * 128**2,
    )  # fmt: skip
    assert limited.solver == 4 * 256**2 + 4 * 256**2
    limited = plan_memory(
        model, spec, config_from_dict(GPTQ), 4, 32, 2, torch.float32,
        max_stage_bytes=5 * 4 * 128**2,
    )  # fmt: skip
    assert limited.solver == 4 * 5 * 128**2 + 4 * 256**2
