"""The mma kernel layout on the CPU: the PyTorch repack and its inverse
(quantlab/formats/groupwise_int_mma_layout.py), the compiled repack op built on the kernel's own
index maps (csrc/groupwise_int/mma_repack.h) against it, the op's reference, and QuantLinear's
handling of the kernel buffers. The kernel's reads of this layout are checked by running its real
source on the CPU emulation (tests/emulation/test_groupwise_int_mma_emulation.py), not here.
"""

from __future__ import annotations

import pytest
import torch

from quantlab.formats import bitstream
from quantlab.formats import groupwise_int_mma_layout as rp
from quantlab.formats.groupwise_int import pack
from quantlab.nn import QuantLinear
from quantlab.ops import groupwise_int as ops
from quantlab.ops import groupwise_int_reference as reference
from quantlab.solvers.rtn import rtn_quantize

SCALE_DTYPES = (torch.float16, torch.bfloat16)


def _weight(n: int, k: int, bits: int, group: int, sym: bool, scale_dtype: torch.dtype) -> tuple:
    """Random codes over the full range (top bit of words set included), random zero points,
    scales of ~2 / 2**bits (exported layout)."""
    gen = torch.Generator().manual_seed(n * 7919 + k * 31 + bits * 3 + int(sym) + group)
    groups = 1 if group == -1 else k // group
    q = torch.randint(0, 2**bits, (n, k), generator=gen)
    qw = bitstream.pack_bitstream(q, bits)
    s = ((torch.rand(n, groups, generator=gen) + 0.5) * (2.0 / 2**bits)).to(scale_dtype)
    qz = None
    if not sym:
        qz = bitstream.pack_bitstream(torch.randint(0, 2**bits, (n, groups), generator=gen), bits)
    return qw, s, qz


# (N, K): one tile, N not a multiple of 64 (padded columns), K not a multiple of 64 (padded k
# inside and past the last group), N past one CTA (256 columns); every encoding on each. Plus a
# real SmolLM2 shape (k/v 192 x 576) for the default encoding.
SHAPES = ((64, 64), (100, 96), (7, 160), (260, 128))
CASES = [
    (n, k, bits, group, sym, sdt)
    for n, k in SHAPES
    for bits in rp.SUPPORTED_BITS
    for group in (32, 64, 128, -1)
    for sym in (False, True)
    for sdt in SCALE_DTYPES
    if group == -1 or k % group == 0
] + [(192, 576, 4, 64, False, torch.float16), (192, 576, 8, -1, True, torch.bfloat16)]


@pytest.mark.parametrize(("n", "k", "bits", "group", "sym", "scale_dtype"), CASES)
def test_repack_has_the_layout_shapes_and_inverts_exactly(
    n: int, k: int, bits: int, group: int, sym: bool, scale_dtype: torch.dtype
) -> None:
    qw, s, qz = _weight(n, k, bits, group, sym, scale_dtype)
    rep = rp.repack(qw, s, qz, bits, group, k)
    ref = reference.groupwise_int_dequant(qw, s, qz, bits, group, k, torch.float32)
    assert {name: tuple(t.shape) for name, t in _tensors(rep).items()} == rep.layout.shapes()
    assert torch.equal(rp.dequant_repacked(rep), ref)


needs_compiled_repack = pytest.mark.skipif(
    not ops.compiled("cpu", "groupwise_int_mma_repack"),
    reason="the CPU extension of groupwise_int is not built",
)


def _assert_same_tensors(got: rp.RepackedWeight, want: rp.RepackedWeight) -> None:
    assert got.layout == want.layout
    assert torch.equal(got.qweight, want.qweight)
    assert got.scales.dtype == want.scales.dtype
    assert torch.equal(got.scales.view(torch.int16), want.scales.view(torch.int16))
    assert (got.zeros is None) == (want.zeros is None)
    if want.zeros is not None:
        assert torch.equal(got.zeros, want.zeros)


@needs_compiled_repack
@pytest.mark.parametrize(("n", "k", "bits", "group", "sym", "scale_dtype"), CASES)
def test_compiled_repack_equals_the_reference(
    n: int, k: int, bits: int, group: int, sym: bool, scale_dtype: torch.dtype
) -> None:
    """The C++ repack (mma_repack.h over mma_layout.h, the maps the kernel reads with) writes
    the PyTorch reference's tensors bit for bit, padding included."""
    qw, s, qz = _weight(n, k, bits, group, sym, scale_dtype)
    q, sc, z = torch.ops.quantlab.groupwise_int_mma_repack(qw, s, qz, bits, group, k)
    layout = rp.mma_layout(bits, group, k, n, sym)
    got = rp.RepackedWeight(q, sc, None if sym else z, layout)
    assert z.numel() == 0 if sym else z.shape == layout.shapes()["zeros"]
    _assert_same_tensors(got, rp.repack(qw, s, qz, bits, group, k))


@needs_compiled_repack
def test_compiled_repack_takes_strided_inputs_and_checks_its_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n, k = 100, 96
    qw, s, qz = _weight(n, k, 4, 32, False, torch.float16)
    want = rp.repack(qw, s, qz, 4, 32, k)

    def no_reference(*args: object) -> None:
        raise AssertionError("the CPU kernel should have run, not the PyTorch reference")

    # Layers on the CPU go through the compiled repack (the kernel policy's CPU default).
    monkeypatch.setattr(ops, "repack", no_reference)
    strided = (qw.t().contiguous().t(), s.t().contiguous().t(), qz.t().contiguous().t())
    assert not strided[1].is_contiguous()
    _assert_same_tensors(ops.mma_repack(*strided, 4, 32, k), want)
    op = torch.ops.quantlab.groupwise_int_mma_repack
    q3 = bitstream.pack_bitstream(torch.zeros(n, k, dtype=torch.int64), 3)
    with pytest.raises(RuntimeError, match="4- or 8-bit codes, got 3"):
        op(q3, s, None, 3, 32, k)
    with pytest.raises(RuntimeError, match="fp16 or bf16 scales"):
        op(qw, s.float(), qz, 4, 32, k)
    with pytest.raises(RuntimeError, match="qweight must be"):
        op(qw[:, :-1], s, qz, 4, 32, k)
    with pytest.raises(RuntimeError, match="qzeros must be"):
        op(qw, s, qz[:-1], 4, 32, k)
    # The layer-facing wrapper refuses with the reference's ValueError on either path.
    with pytest.raises(ValueError, match="does not take this weight: 3-bit"):
        ops.mma_repack(q3, s, None, 3, 32, k)


@needs_compiled_repack
def test_repack_op_passes_opcheck() -> None:
    """Schema, fake impl and dispatch agree (torch.compile can trace the repack)."""
    for sym in (False, True):
        qw, s, qz = _weight(72, 64, 8, 16, sym, torch.bfloat16)
        torch.library.opcheck(
            torch.ops.quantlab.groupwise_int_mma_repack,
            (qw, s, qz, 8, 16, 64),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


def _tensors(rep: rp.RepackedWeight) -> dict[str, torch.Tensor]:
    out = {"qweight": rep.qweight, "scales": rep.scales}
    if rep.zeros is not None:
        out["zeros"] = rep.zeros
    return out


def test_padding_is_zero_and_every_word_is_a_real_code() -> None:
    """Padded columns / k carry code 0, scale 0 and zero point 0: their weights are exactly 0."""
    n, k = 100, 96
    qw, s, qz = _weight(n, k, 4, 32, False, torch.float16)
    rep = rp.repack(qw, s, qz, 4, 32, k)
    lay = rep.layout
    assert (lay.n_pad, lay.k_pad, lay.n_groups) == (128, 128, 4)
    full = rp.RepackedWeight(
        rep.qweight, rep.scales, rep.zeros, rp.mma_layout(4, 32, lay.k_pad, lay.n_pad, False)
    )
    dense = rp.dequant_repacked(full)
    assert torch.equal(dense[n:], torch.zeros_like(dense[n:]))
    assert torch.equal(dense[:, k:], torch.zeros_like(dense[:, k:]))


@pytest.mark.parametrize("k_tiles", [1, 2, 3, 7, 9, 64, 224])
def test_split_plan_partitions_k(k_tiles: int) -> None:
    for requested in range(1, 20):
        splits, per = rp.split_plan(k_tiles, requested)
        assert 1 <= splits <= min(requested, rp.MAX_SPLITS, k_tiles)
        ranges = [(z * per, min(k_tiles, (z + 1) * per)) for z in range(splits)]
        assert all(lo < hi for lo, hi in ranges)  # none empty
        covered = [t for lo, hi in ranges for t in range(lo, hi)]
        assert covered == list(range(k_tiles))


def test_mma_op_reference_matches_the_generic_op() -> None:
    """``groupwise_int_mma_mm`` on the CPU (its reference) agrees with ``groupwise_int_mm`` up to
    the rounding of W to the activation dtype; its shape contract is what the fake impl says."""
    torch.manual_seed(0)
    r = rtn_quantize(torch.randn(96, 192), 4, 64, False)
    p = pack(r)
    rep = rp.repack(p.qweight, p.scales, p.qzeros, 4, 64, 192)
    x = torch.randn(3, 192).to(torch.bfloat16)
    y = ops.mma_matmul(x, rep)
    want = (x.float() @ r.dequantize().to(torch.bfloat16).float().t()).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    with pytest.raises(ValueError, match="x must be fp16 or bf16"):
        ops.mma_matmul(x.float(), rep)


def test_fast_path_refusals_are_named() -> None:
    assert rp.fast_path_reason(4, 64, 576, torch.float16) is None
    assert rp.fast_path_reason(8, -1, 100 * 8, torch.bfloat16) is None
    assert "3-bit" in rp.fast_path_reason(3, 64, 576, torch.float16)
    assert "float32 scales" in rp.fast_path_reason(4, 64, 576, torch.float32)
    assert "multiple of 8" in rp.fast_path_reason(4, -1, 100, torch.float16)
    assert "multiple of 16" in rp.fast_path_reason(4, 8, 64, torch.float16)
    qw, s, qz = _weight(8, 64, 4, 32, False, torch.float32)
    with pytest.raises(ValueError, match="does not take this weight: torch.float32 scales"):
        rp.repack(qw, s, qz, 4, 32, 64)


def test_quant_linear_keeps_no_kernel_copy_on_the_cpu() -> None:
    """The repacked buffers exist only on CUDA; they are never in the state dict."""
    torch.manual_seed(0)
    layer = QuantLinear.from_packed(pack(rtn_quantize(torch.randn(64, 128), 4, 64, False)))
    assert layer.mma_qweight is None and not layer.prepare_kernel_layout()
    assert layer.kernel_path(torch.randn(2, 128)) == "groupwise_int_mm"
    assert set(layer.state_dict()) == {"qweight", "scales", "qzeros"}


def test_quant_linear_compiles_fullgraph_with_the_kernel_buffers() -> None:
    """torch.compile(fullgraph=True) traces QuantLinear's dispatch (the mma buffers are plain
    module state; on the CPU the generic op runs)."""
    torch.manual_seed(0)
    layer = QuantLinear.from_packed(pack(rtn_quantize(torch.randn(32, 64), 4, 32, False)))
    fn = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(fn(x), layer(x))
