"""The mma layout's producers against its consumer's index math: the PyTorch reference repack
(quantlab/formats/groupwise_int_mma_layout.py) puts every code, scale and zero point where
csrc/groupwise_int/mma_layout.h -- the index math the kernel itself calls -- says it is, and plans
split-K the same way (the maps come from the emulation runner, compiled from that header); and the
CUDA repack kernel (cuda_mma_repack.cu, built on that header), run on the emulation under ASan and
TSan, writes exactly the reference's tensors."""

from __future__ import annotations

import pytest
import torch

from quantlab.formats import bitstream
from quantlab.formats import groupwise_int_mma_layout as rp
from tests.emulation.cases import integer_weight
from tests.emulation.emulator import Call, Emulator, assert_bits

pytestmark = pytest.mark.emulation

CASES = [
    (100, 96, 4, 32, False),
    (64, 200, 8, -1, True),
    (300, 256, 4, 128, True),
    (72, 64, 8, 16, False),
]


def _maps(emulator: Emulator, lay: rp.MmaLayout) -> dict[str, torch.Tensor]:
    params = {"n": lay.out_features, "k": lay.in_features, "bits": lay.bits}
    params["group_size"] = lay.kernel_group
    outputs = {
        "qpos": (torch.int64, (lay.n_pad, lay.k_pad, 2)),
        "spos": (torch.int64, (lay.n_pad, lay.n_groups)),
        "zpos": (torch.int64, (lay.n_pad, lay.n_groups, 2)),
        "plan": (torch.int64, (21, 2)),
    }
    return emulator.run([Call("groupwise_int_mma_layout_map", params, {}, outputs)])[0]


def _field(words: torch.Tensor, pos: torch.Tensor, bits: int) -> torch.Tensor:
    flat = words.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    return (flat[pos[..., 0]] >> pos[..., 1]) & ((1 << bits) - 1)


@pytest.mark.parametrize(("n", "k", "bits", "group", "sym"), CASES)
def test_repack_places_every_value_where_the_kernel_reads_it(
    plain_emulator: Emulator, n: int, k: int, bits: int, group: int, sym: bool
) -> None:
    qw, s, qz, _ = integer_weight(n, k, bits, group, sym, torch.float16)
    rep = rp.repack(qw, s, qz, bits, group, k)
    lay = rep.layout
    maps = _maps(plain_emulator, lay)
    codes = torch.zeros(lay.n_pad, lay.k_pad, dtype=torch.int64)
    codes[:n, :k] = bitstream.unpack_bitstream(qw, bits, k).to(torch.int64)
    assert torch.equal(_field(rep.qweight, maps["qpos"], bits), codes)
    # Scales and zero points per (column, kernel group); padded columns and groups hold 0.
    per_col = 1 if group == -1 else k // group
    scales = torch.zeros(lay.n_pad, lay.n_groups, dtype=s.dtype)
    scales[:n, :per_col] = s
    assert torch.equal(rep.scales.reshape(-1)[maps["spos"]], scales)
    if not sym:
        zeros = torch.zeros(lay.n_pad, lay.n_groups, dtype=torch.int64)
        zeros[:n, :per_col] = bitstream.unpack_bitstream(qz, bits, per_col).to(torch.int64)
        assert torch.equal(_field(rep.zeros, maps["zpos"], bits), zeros)
    k_tiles = lay.k_pad // rp.STAGE_K
    plan = [list(rp.split_plan(k_tiles, r)) for r in range(21)]
    assert maps["plan"].tolist() == plan


@pytest.mark.parametrize(("n", "k", "bits", "group", "sym"), CASES)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_cuda_repack_kernel_writes_the_reference_tensors(
    emulator: Emulator, n: int, k: int, bits: int, group: int, sym: bool, scale_dtype: torch.dtype
) -> None:
    """Every output element is compared (the runner fills outputs with 0xFF first, so one the
    kernel never writes shows up), padding included."""
    qw, s, qz, _ = integer_weight(n, k, bits, group, sym, scale_dtype)
    want = rp.repack(qw, s, qz, bits, group, k)
    shapes = want.layout.shapes()
    inputs = {"qweight": qw, "scales": s}
    outputs = {"q": (torch.int32, shapes["qweight"]), "s": (scale_dtype, shapes["scales"])}
    if not sym:
        inputs["qzeros"] = qz
        outputs["z"] = (torch.int32, shapes["zeros"])
    params = {"n": n, "k": k, "bits": bits, "groups": s.shape[1]}
    params["group_size"] = want.layout.kernel_group
    got = emulator.run([Call("groupwise_int_mma_repack", params, inputs, outputs)])[0]
    assert torch.equal(got["q"], want.qweight)
    assert_bits(got["s"], want.scales, "scales")
    if not sym:
        assert torch.equal(got["z"], want.zeros)
