"""The collectives of a multi-process run (quantlab.calib.parallel), on real gloo process groups of
2 and 3 CPU ranks spawned by the test, and the pure parts (shares, owners) directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quantlab.calib.parallel import DistributedFailure, Parallel, assign_owners, solve_cost
from quantlab.calib.stats import HessianAccumulator
from quantlab.formats.bitstack import BitStackResult
from quantlab.formats.pvq import PVQResult
from quantlab.formats.pvq_codebook import PVQParams


def _records() -> tuple[PVQResult, BitStackResult]:
    """Two solver results with every kind of field: integer, float, bool tensors, a nested
    parameter record, a list of floats (a NaN among them), a loss of None."""
    g = torch.Generator().manual_seed(7)
    pvq = PVQResult(
        points=torch.randint(-3, 4, (3, 8), generator=g, dtype=torch.int16),
        gain_codes=torch.randint(0, 4, (3, 2), generator=g),
        row_scales=torch.rand(3, generator=g),
        levels=torch.rand(4, generator=g).sort().values,
        signs=torch.where(torch.rand(8, generator=g) < 0.5, -1, 1).to(torch.int8),
        params=PVQParams(4, 3, 4),
        loss=0.1 + 1e-17,
    )
    stack = BitStackResult(
        positive=torch.rand(2, 3, 5, generator=g) < 0.5,
        u=torch.randn(2, 3, 1, generator=g),
        v=torch.randn(2, 1, 5, generator=g),
        errors=[1.0 / 3.0, float("nan"), 2.5e-30],
        seconds=1.25,
    )
    return pvq, stack


def _same_record(a: object, b: object) -> bool:
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            if not (value.dtype == other.dtype and torch.equal(value, other)):
                return False
        elif repr(value) != repr(other):  # repr: NaN equals itself, floats bit for bit
            return False
    return True


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("n_windows", [5, 7, 16])
def test_the_shares_cover_every_window_once_and_differ_by_at_most_one(
    world: int, n_windows: int
) -> None:
    if n_windows < world:
        pytest.skip("refused: see the next test")
    shares = [Parallel(rank, world).share(n_windows) for rank in range(world)]
    covered = [i for share in shares for i in range(n_windows)[share]]
    assert covered == list(range(n_windows))
    sizes = [share.stop - share.start for share in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_more_ranks_than_windows_is_refused() -> None:
    with pytest.raises(ValueError, match="3 calibration windows for 4 ranks"):
        Parallel(0, 4).share(3)


def test_owners_balance_the_cost_not_the_count() -> None:
    # A Llama block's seven linears (8B shapes): down (K = 14336) costs more than all the rest.
    shapes = {
        "q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096),
        "gate": (4096, 14336), "up": (4096, 14336), "down": (14336, 4096),
    }  # fmt: skip
    costs = [solve_cost("gptq", k, n) for k, n in shapes.values()]
    owners = assign_owners(costs, 2)
    names = list(shapes)
    assert [names[i] for i, r in enumerate(owners) if r == 0] == ["down"]
    assert owners == assign_owners(costs, 2)  # deterministic
    loads = [sum(c for c, r in zip(costs, owners, strict=True) if r == rank) for rank in (0, 1)]
    round_robin = [sum(costs[i] for i in range(len(costs)) if i % 2 == rank) for rank in (0, 1)]
    assert max(loads) < max(round_robin)
    # Every item goes somewhere, ties go to the lower rank, one rank takes everything.
    assert assign_owners([1.0, 1.0, 1.0], 3) == [0, 1, 2]
    assert assign_owners([3.0, 2.0], 1) == [0, 0]
    with pytest.raises(ValueError, match="world_size"):
        assign_owners([1.0], 0)


def test_a_single_process_is_the_same_code_with_no_collectives() -> None:
    single = Parallel.current()
    assert not single.active and single.is_main and single.share(4) == slice(0, 4)
    partial = torch.ones(2, 2)
    assert single.reduce_to(0, partial, 0.5) is partial and torch.equal(
        partial, torch.full((2, 2), 0.5)
    )
    assert single.gather_floats([1.0, 2.0]) == [[1.0, 2.0]]
    pvq, _ = _records()
    assert single.broadcast_record(pvq, 0, PVQResult, torch.device("cpu")) is pvq
    single.settle(None)
    with pytest.raises(KeyError, match="boom"):
        single.settle(KeyError("boom"))


def _weighted_rows(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    rows = torch.randn(3 + rank, 6, generator=generator)
    return rows, torch.rand(3 + rank, generator=generator) + 0.05


def _rank_main(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        parallel = Parallel.current()
        result: dict[str, object] = {"rank": parallel.rank, "world": parallel.world_size}
        # Each rank's partial and weight; the owner forms the sum in the fixed order.
        generator = torch.Generator().manual_seed(rank)
        partial = torch.randn(5, 7, generator=generator)
        sent = partial.clone()
        total = parallel.reduce_to(world - 1, partial, (rank + 1) / 10)
        result["reduced"] = None if total is None else total.flatten().tolist()
        result["sender_unchanged"] = bool(torch.equal(partial, sent)) if total is None else None
        result["reduce_traffic"] = [
            parallel.traffic.bytes_out.get("reduce", 0),
            parallel.traffic.bytes_in.get("reduce", 0),
            parallel.traffic.calls["reduce"],
        ]
        # Broadcast overwrites every rank's tensors with the owner's.
        codes = torch.full((3, 4), rank, dtype=torch.int32)
        scales = torch.full((3,), float(rank))
        parallel.broadcast([codes, scales], owner=1)
        result["broadcast"] = [codes.flatten().tolist(), scales.tolist()]
        result["gathered"] = parallel.gather_floats([float(rank), rank * 0.5])
        # Weighted rows (a routed expert's routing weights): each rank's share is its weight.
        rows, weights = _weighted_rows(rank)
        hessian = HessianAccumulator(6)
        hessian.add(rows, weights)
        hessian.reduce_to_owners(parallel, [0])
        result["weighted_hessian"] = (
            [hessian.hessian().flatten().tolist(), hessian.weight, hessian.n_tokens]
            if rank == 0
            else None
        )
        # A solver's result from its owner: every rank gets it whole, knowing only its kind.
        records = []
        for expected in _records():
            mine = expected if rank == 1 else None
            got = parallel.broadcast_record(mine, 1, type(expected), torch.device("cpu"))
            records.append(_same_record(got, expected) and (rank != 1 or got is expected))
        result["records"] = records
        # No failure: everyone goes on. Rank 1 fails: everyone stops, naming it.
        parallel.settle(None)
        try:
            parallel.settle(ValueError("bad Hessian in blk.0.down_proj") if rank == 1 else None)
            result["failure"] = None
        except DistributedFailure as failure:
            result["failure"] = ["DistributedFailure", str(failure)]
        except ValueError as own:
            result["failure"] = ["ValueError", str(own)]
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_the_collectives_on_gloo_ranks(tmp_path: Path, world: int) -> None:
    mp.spawn(
        _rank_main,
        args=(world, str(tmp_path / "store"), str(tmp_path)),
        nprocs=world,
        join=True,
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    owner = world - 1
    partials = [torch.randn(5, 7, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    # The fixed order: the owner's own term, then the other ranks ascending.
    expected = partials[owner] * ((owner + 1) / 10)
    for r in range(world):
        if r != owner:
            expected.add_(partials[r], alpha=(r + 1) / 10)
    for r, result in enumerate(results):
        assert result["rank"] == r and result["world"] == world
        # The payload each rank moved: 35 fp32 values and the fp64 coefficient per sender.
        payload = 5 * 7 * 4 + 8
        assert result["reduce_traffic"] == (
            [0, payload * (world - 1), 1] if r == owner else [payload, 0, 1]
        )
        if r == owner:
            assert torch.equal(torch.tensor(result["reduced"]).view(5, 7), expected)
        else:
            assert result["reduced"] is None and result["sender_unchanged"]
        assert result["broadcast"] == [[1] * 12, [1.0] * 3]
        assert result["gathered"] == [[float(q), q * 0.5] for q in range(world)]
        assert result["records"] == [True, True]
        if r == 0:
            rows, weights = zip(*(_weighted_rows(q) for q in range(world)), strict=True)
            x, w = torch.cat(rows).double(), torch.cat(weights).double()
            hessian, weight, n_tokens = result["weighted_hessian"]
            # fp32 per-rank averages summed by weight share, against one fp64 formula.
            torch.testing.assert_close(
                torch.tensor(hessian, dtype=torch.float64).view(6, 6),
                2 * (x.t() * w) @ x / w.sum(),
                rtol=1e-5,
                atol=1e-6,
            )
            assert n_tokens == x.shape[0] and weight == pytest.approx(float(w.sum()), rel=1e-6)
        else:
            assert result["weighted_hessian"] is None
        if r == 1:
            assert result["failure"] == ["ValueError", "bad Hessian in blk.0.down_proj"]
        else:
            assert result["failure"] == [
                "DistributedFailure",
                f"rank 1 of {world} failed: ValueError: bad Hessian in blk.0.down_proj",
            ]


def test_current_reads_an_initialised_group(tmp_path: Path) -> None:
    """Inside an initialised one-rank group the run is still single (no collectives)."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        assert Parallel.current() == Parallel(0, 1)
    finally:
        dist.destroy_process_group()
