"""The emulation's checkers catch what they exist for: each test breaks the real mma kernel
source in one place (a missing barrier, a wrong cp.async wait count, an off-by-one bounds guard,
a shared-memory read past the end, a misaligned vector load, a skipped shared-memory fill, an
early exit before a barrier, a split-K counter left set), builds that variant, runs it on a
shape that reaches the broken line, and requires the checker's report. The unbroken kernel passes
the same runs (the other emulation tests), so each report is the checker's doing, not noise.
"""

from __future__ import annotations

import pytest
import torch

from tests.emulation.cases import integer_weight, small_integer_x
from tests.emulation.emulator import Call, EmulationFailure, Emulator
from tests.emulation.test_groupwise_int_mma_emulation import mma_call

pytestmark = [pytest.mark.emulation, pytest.mark.slow]

KERNEL = "groupwise_int/cuda_mma_kernel.cuh"
WAIT = "    cp_async_wait<kStages - 2>();\n    __syncthreads();\n"


def _case(m: int = 5, n: int = 300, k: int = 256, group: int = 64, splits: int = 1) -> Call:
    qw, s, qz, _ = integer_weight(n, k, 4, group, False, torch.float16)
    x = small_integer_x(m, k, torch.float16, seed=7)
    return mma_call(x, qw, s, qz, 4, group, n, k, splits)


def _broken(flavor: str, old: str, new: str) -> Emulator:
    return Emulator.build(flavor, mutation=(KERNEL, old, new))


def _report(emulator: Emulator, call: Call) -> str:
    with pytest.raises(EmulationFailure) as failure:
        emulator.run([call])
    return failure.value.stderr


def test_missing_barrier_is_a_shared_memory_race() -> None:
    """Without the stage barrier, one thread's cp.async lands A rows another warp reads with
    ldmatrix, with nothing ordering the two."""
    emulator = _broken("tsan", WAIT, "    cp_async_wait<kStages - 2>();\n")
    report = _report(emulator, _case())
    assert "ThreadSanitizer: data race" in report
    assert "cuda_mma_kernel.cuh" in report


def test_wrong_wait_count_reads_a_cp_async_destination_before_its_wait() -> None:
    emulator = _broken("asan", WAIT, WAIT.replace("kStages - 2", "kStages - 1"))
    report = _report(emulator, _case())
    assert "AddressSanitizer: use-after-poison" in report
    assert "ldmatrix" in report or "cuda_mma_kernel.cuh" in report


def test_off_by_one_row_guard_reads_past_the_activations() -> None:
    """``m <= a.m`` lets the row just past the batch be loaded: one row beyond x's buffer."""
    old = "const bool valid = m < a.m && k < a.w.k;"
    emulator = _broken("asan", old, old.replace("m < a.m", "m <= a.m"))
    report = _report(emulator, _case(m=5))
    assert "AddressSanitizer: heap-buffer-overflow" in report
    assert "READ of size" in report


def test_shared_memory_read_past_the_end() -> None:
    """The zero points read from the end of the ring instead of their stage's section: just past
    the CTA's dynamic shared memory (a heap block of exactly its size under the emulation)."""
    old = "reinterpret_cast<const uint32_t*>(z_smem(st) + slot * BITS)[q]"
    emulator = _broken("asan", old, old.replace("z_smem(st) + slot", "smem + L::kTotal + slot"))
    report = _report(emulator, _case(k=512))
    assert "AddressSanitizer: heap-buffer-overflow" in report and "READ of size 4" in report


def test_misaligned_vector_load_of_shared_memory() -> None:
    old = "*reinterpret_cast<const uint4*>(s_smem(st) + slot * 16);"
    emulator = _broken("asan", old, old.replace("slot * 16)", "slot * 16 + 4)"))
    report = _report(emulator, _case())
    assert "misaligned address" in report and "uint4" in report


def test_skipped_scale_load_reads_uninitialised_shared_memory() -> None:
    """Scales of the tile's group never copied: the output then depends on whatever the shared
    memory held, which the differential run (two fill bytes) exposes."""
    emulator = _broken("plain", "if (r <= last - first) {", "if (r < last - first) {")
    call = _case(group=64)
    zero = emulator.run([call], env={"QUANTLAB_EMU_SMEM_FILL": "0x00"})[0]["y"]
    ones = emulator.run([call], env={"QUANTLAB_EMU_SMEM_FILL": "0x3C"})[0]["y"]
    assert not torch.equal(zero.view(torch.int16), ones.view(torch.int16))


def test_early_exit_before_a_barrier_is_reported() -> None:
    """An idle warp (N = 100 leaves warps 2 and 3 of the CTA without columns) that returns
    instead of skipping the compute would leave the others waiting at the next __syncthreads."""
    emulator = _broken("plain", "if (!warp_active) continue;", "if (!warp_active) return;")
    report = _report(emulator, _case(n=100))
    assert "quantlab-emulation: barrier divergence" in report


def test_split_k_counter_left_set_is_reported() -> None:
    """The last CTA of a tile resets its counter for the next launch on the same buffer."""
    old = "if (tid == 0) a.counters[counter] = 0;"
    emulator = _broken("plain", old, "if (tid == 0) (void)counter;")
    call = _case(m=3, n=64, k=1024, splits=4)
    call.params["launches"] = 2
    report = _report(emulator, call)
    assert "quantlab-emulation: split-K: a tile counter was left" in report
