"""The tensor-core mma kernel (csrc/groupwise_int/cuda_mma*.cu) on repacked weights, against the
PyTorch reference, and QuantLinear's dispatch to it. Needs a CUDA device (sm_80+) and a CUDA
build of the extension; skipped otherwise.

Assertions (the same as the CPU emulation's, tests/emulation/test_groupwise_int_mma_emulation.py):
the data are integer-valued -- codes, zero points, small integer activations, power-of-two scales
-- so every product and every partial sum is exact in fp32 in any order (tensor-core order,
split-K), and each output must equal the fp64 oracle rounded once to the output dtype, bit for
bit. A misplaced or mis-decoded weight changes an output; an fp32 rounding bound
(``fp32_dot_bound``, ~1.06 at K = 4096 for real-valued data) could not have caught it.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from quantlab.formats import bitstream
from quantlab.formats import groupwise_int_mma_layout as rp
from quantlab.formats.groupwise_int import GroupwiseIntMeta, PackedGroupwiseInt
from quantlab.nn import QuantLinear
from quantlab.ops import groupwise_int as ops
from quantlab.ops import groupwise_int_reference as reference
from quantlab.ops._extension import extension_error
from quantlab.ops.kernel_policy import KernelPathWarning
from tests.tolerances import fp32_dot_bound


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if not ops.has_mma_kernel():
        return f"mma kernel not built: {extension_error() or 'the extension has no CUDA'}"
    if torch.cuda.get_device_capability()[0] < 8:
        return "the mma kernel needs sm_80+"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

DTYPES = (torch.float16, torch.bfloat16)


def _weight(
    n: int, k: int, bits: int, group: int, sym: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator(device="cuda").manual_seed(n * 7919 + k * 31 + bits * 3 + int(sym))
    groups = 1 if group == -1 else k // group
    q = torch.randint(0, 2**bits, (n, k), device="cuda", generator=gen)
    # Powers of two: exact in fp16 and bf16, and (q - z) * s stays exact in every dtype.
    s = 2.0 ** torch.randint(-3, 1, (n, groups), device="cuda", generator=gen).float()
    qz = None
    if not sym:
        z = torch.randint(0, 2**bits, (n, groups), device="cuda", generator=gen)
        qz = bitstream.pack_bitstream(z, bits)
    return bitstream.pack_bitstream(q, bits), s.to(scale_dtype), qz


def _x(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(m * 131 + k)
    return torch.randint(-2, 3, (m, k), device="cuda", generator=gen).to(dtype)


def _assert_close(y: torch.Tensor, x: torch.Tensor, w_dt: torch.Tensor) -> None:
    """Exact: the fp64 oracle rounded once to the output dtype, bit for bit (the module
    docstring says why that holds on integer-valued data); every output written."""
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w_dt.shape[0])
    want = (x.double() @ w_dt.double().t()).to(x.dtype)
    bad = (y.view(torch.int16) != want.view(torch.int16)).nonzero()
    assert bad.numel() == 0, f"{len(bad)} outputs differ, first at {bad[0].tolist()}"


def _assert_within_rounding(y: torch.Tensor, x: torch.Tensor, w_dt: torch.Tensor) -> None:
    """Real-valued data: within the fp32 accumulation bound of the actual operands plus half an
    ulp (a realism check; the exact checks above are the ones that catch a wrong weight)."""
    oracle = x.double() @ w_dt.double().t()
    eps = torch.finfo(x.dtype).eps
    bound = fp32_dot_bound(x, w_dt) + eps * y.double().abs() + 2.0**-24
    assert bool(((y.double() - oracle).abs() <= bound).all())


def _case(m: int, n: int, k: int, bits: int, group: int, sym: bool, sdt: torch.dtype, act):  # noqa: ANN001, ANN202
    qw, s, qz = _weight(n, k, bits, group, sym, sdt)
    rep = rp.repack(qw, s, qz, bits, group, k)
    w_dt = reference.groupwise_int_dequant(qw, s, qz, bits, group, k, torch.float32).to(act)
    return rep, w_dt, _x(m, k, act)


# Batches 1-8 (one m16 tile, formerly the GEMV), 16/17/32/33/64/65 (tile edges), up to 255;
# N from one warp slab to past several CTAs, not a multiple of 64; K from one stage to
# Llama-sized, not a multiple of 64.
SHAPE_CASES = [
    (m, n, k)
    for m in (1, 3, 8, 16, 17, 33, 65, 255)
    for n, k in ((64, 64), (100, 96), (300, 576), (4096, 4096), (1000, 1032))
]


@pytest.mark.parametrize("split_k", [1, 3, 0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), SHAPE_CASES)
def test_mma_shapes_match_reference(
    m: int, n: int, k: int, dtype: torch.dtype, split_k: int
) -> None:
    group = 64 if k % 64 == 0 else (32 if k % 32 == 0 else -1)  # K = 1032: per-channel only
    rep, w_dt, x = _case(m, n, k, 4, group, False, dtype, dtype)
    _assert_close(ops.mma_matmul(x, rep, split_k), x, w_dt)


FORMAT_CASES = [
    (bits, group, sym, sdt)
    for bits in rp.SUPPORTED_BITS
    for group in (32, 64, 128, -1)
    for sym in (False, True)
    for sdt in DTYPES
]


@pytest.mark.parametrize(("n", "k"), [(64, 64), (100, 96), (300, 576), (1000, 1032)])
@pytest.mark.parametrize(("bits", "group", "sym", "scale_dtype"), FORMAT_CASES)
def test_cuda_repack_equals_the_reference(
    n: int, k: int, bits: int, group: int, sym: bool, scale_dtype: torch.dtype
) -> None:
    """The CUDA repack kernel (cuda_mma_repack.cu) writes the PyTorch reference's tensors bit for
    bit (every element: padding included)."""
    if group != -1 and k % group:
        group = -1
    qw, s, qz = _weight(n, k, bits, group, sym, scale_dtype)
    q, sc, z = torch.ops.quantlab.groupwise_int_mma_repack(qw, s, qz, bits, group, k)
    want = rp.repack(qw, s, qz, bits, group, k)
    assert torch.equal(q, want.qweight)
    assert torch.equal(sc.view(torch.int16), want.scales.view(torch.int16))
    if sym:
        assert z.numel() == 0
    else:
        assert torch.equal(z, want.zeros)


@pytest.mark.parametrize("act", DTYPES)
@pytest.mark.parametrize(("bits", "group", "sym", "scale_dtype"), FORMAT_CASES)
def test_mma_every_format_matches_reference(
    bits: int, group: int, sym: bool, scale_dtype: torch.dtype, act: torch.dtype
) -> None:
    """Both dequant modes (half math where scale dtype == act dtype, fp32 otherwise), 4 and 8
    bits, every group size, with and without split-K, on a shape with padded N and K."""
    for m, n, k, split_k in ((5, 200, 384, 1), (40, 72, 1152, 4)):
        if group != -1 and k % group:
            continue
        rep, w_dt, x = _case(m, n, k, bits, group, sym, scale_dtype, act)
        _assert_close(ops.mma_matmul(x, rep, split_k), x, w_dt)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_split_k_is_deterministic_and_consistent(dtype: torch.dtype) -> None:
    rep, w_dt, x = _case(9, 4096, 4096, 4, 128, False, dtype, dtype)
    one = ops.mma_matmul(x, rep, 1)
    for split_k in (0, 2, 5, 16, 64):
        first = ops.mma_matmul(x, rep, split_k)
        for _ in range(3):  # the order of the partial sums never depends on CTA timing
            assert torch.equal(ops.mma_matmul(x, rep, split_k), first), split_k
        _assert_close(first, x, w_dt)
        assert torch.equal(first, one)
    # Real-valued activations: the summation order differs between splits, so only the
    # operands' rounding bound holds; still deterministic run to run.
    xr = torch.randn(9, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    xr = xr.to(dtype)
    for split_k in (1, 5):
        y = ops.mma_matmul(xr, rep, split_k)
        assert torch.equal(ops.mma_matmul(xr, rep, split_k), y)
        _assert_within_rounding(y, xr, w_dt)


def test_mma_split_heuristic_fills_the_gpu() -> None:
    splits = torch.ops.quantlab.groupwise_int_mma_splits
    for dtype in DTYPES:
        # 4096 columns are 16 CTAs: far fewer than the SMs, so K is split.
        assert splits(1, 4096, 4096, 4, 128, torch.float16, dtype, 0) > 1
        assert splits(1, 4096, 4096, 4, 128, torch.float16, dtype, 3) == 3
        assert splits(1, 4096, 4096, 4, 128, torch.float16, dtype, 999) == rp.MAX_SPLITS
        assert splits(1, 64, 64, 4, 64, torch.float16, dtype, 0) == 1  # a single k tile


def test_mma_unaligned_x_and_empty_batch() -> None:
    rep, w_dt, x = _case(33, 100, 576, 4, 64, False, torch.float16, torch.float16)
    want = ops.mma_matmul(x, rep, 1)
    flat = torch.empty(x.numel() + 1, device="cuda", dtype=x.dtype)
    flat[1:] = x.reshape(-1)
    shifted = flat[1:].view_as(x)
    assert shifted.data_ptr() % 16 != 0
    assert torch.equal(ops.mma_matmul(shifted, rep, 1), want)
    assert ops.mma_matmul(x[:0], rep).shape == (0, 100)


def test_mma_cuda_graph_replay() -> None:
    rep, w_dt, x = _case(4, 4096, 4096, 4, 128, False, torch.bfloat16, torch.bfloat16)
    want = ops.mma_matmul(x, rep)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.mma_matmul(x, rep)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.mma_matmul(x, rep)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_mma_bad_arguments_are_named() -> None:
    rep, _, x = _case(3, 64, 128, 4, 64, False, torch.float16, torch.float16)
    lay = rep.layout
    mm = torch.ops.quantlab.groupwise_int_mma_mm
    args = (rep.qweight, rep.scales, rep.zeros, 4, 64, 128, 64, 0)
    with pytest.raises(RuntimeError, match="x must be fp16 or bf16"):
        mm(x.float(), *args)
    with pytest.raises(RuntimeError, match=r"x must be \[M, 128\]"):
        mm(x[:, :64], *args)
    with pytest.raises(RuntimeError, match="qweight must be"):
        mm(x, rep.qweight[:4], *args[1:])
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        mm(x, rep.qweight, rep.scales, rep.zeros, 3, 64, 128, 64, 0)
    with pytest.raises(RuntimeError, match="scales must be fp16 or bf16"):
        mm(x, rep.qweight, rep.scales.float(), rep.zeros, 4, 64, 128, 64, 0)
    with pytest.raises(RuntimeError, match="split_k must be >= 0"):
        mm(x, rep.qweight, rep.scales, rep.zeros, 4, 64, 128, 64, -1)
    assert lay.n_groups == 2


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values in a view that starts 4 bytes past a 16-byte boundary."""
    words = t.numel() * t.element_size() // 4
    buf = torch.empty(words + 1, dtype=torch.int32, device=t.device)
    view = buf[1:].view(t.dtype).view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 == 4 and view.is_contiguous()
    return view


def test_mma_refuses_weights_off_a_16_byte_boundary() -> None:
    """cp.async reads qweight, scales and zeros 16 bytes at a time: a view with a storage offset
    is named in an error instead of faulting on the GPU."""
    rep, _, x = _case(3, 64, 128, 4, 64, False, torch.float16, torch.float16)
    mm = torch.ops.quantlab.groupwise_int_mma_mm
    want = mm(x, rep.qweight, rep.scales, rep.zeros, 4, 64, 128, 64, 0)
    tensors = {"qweight": rep.qweight, "scales": rep.scales, "zeros": rep.zeros}
    for name in tensors:
        bad = dict(tensors, **{name: _misaligned(tensors[name])})
        with pytest.raises(RuntimeError, match=f"{name} must start on a 16-byte boundary"):
            mm(x, bad["qweight"], bad["scales"], bad["zeros"], 4, 64, 128, 64, 0)
        fixed = {k: v.clone() for k, v in bad.items()}
        assert torch.equal(
            mm(x, fixed["qweight"], fixed["scales"], fixed["zeros"], 4, 64, 128, 64, 0), want
        )


def _layer(n: int, k: int, bits: int, group: int, sym: bool, sdt: str) -> QuantLinear:
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[sdt]
    qw, s, qz = _weight(n, k, bits, group, sym, dtype)
    meta = GroupwiseIntMeta(k, n, bits, group, sym, sdt)
    return QuantLinear.from_packed(PackedGroupwiseInt(qw, s, qz, meta))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_linear_dispatch_across_every_boundary(dtype: torch.dtype) -> None:
    """Batches 1..300: mma up to MAX_ROWS, then the generic op (dequantize + cuBLAS); both match
    the reference, and the boundary batches agree with the reference through either path."""
    layer = _layer(576, 576, 4, 64, False, "float16")
    assert layer.mma_qweight is not None
    w_dt = layer.dequantized_weight(torch.float32).to(dtype)
    for m in (1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 128, 254, 255, 256, 257, 300):
        x = _x(m, 576, dtype)
        want_path = "mma" if m <= rp.MAX_ROWS else "groupwise_int_mm"
        assert layer.kernel_path(x) == want_path, m
        y = layer(x)
        if want_path == "mma":
            _assert_close(y, x, w_dt)
        else:
            # cuBLAS may reduce in the activation dtype (torch's default for fp16/bf16 GEMMs):
            # twice torch's own error on this product, plus half an ulp of each output.
            oracle = x.double() @ w_dt.double().t()
            torch_err = float(((x @ w_dt.t()).double() - oracle).abs().max())
            half_ulp = torch.finfo(dtype).eps * oracle.abs()
            assert bool(((y.double() - oracle).abs() <= 2 * torch_err + half_ulp).all())
    # fp32 activations and 3-bit weights never take the mma path.
    assert layer.kernel_path(_x(4, 576, torch.float32)) == "groupwise_int_mm"
    assert _layer(64, 128, 3, 64, False, "float16").mma_qweight is None


def test_quant_linear_repacks_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = ops.mma_repack

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "mma_repack", counting)
    layer = _layer(256, 512, 4, 128, True, "bfloat16")
    assert len(calls) == 1
    x = _x(4, 512, torch.bfloat16)
    first = layer(x)
    for _ in range(5):
        assert torch.equal(layer(x), first)
    assert len(calls) == 1  # not per call
    # An in-place edit of the exported weight is noticed (eager) and repacked once.
    layer.qweight.bitwise_xor_(0x11111111)
    changed = layer(x)
    assert len(calls) == 2 and not torch.equal(changed, first)
    w_dt = layer.dequantized_weight(torch.float32).to(torch.bfloat16)
    _assert_close(changed, x, w_dt)
    # Moving to the CPU drops the kernel copy; back on the GPU it is rebuilt.
    layer.cpu()
    assert layer.mma_qweight is None
    layer.cuda()
    assert layer.mma_qweight is not None and len(calls) == 3


def test_quant_linear_state_dict_and_load() -> None:
    src = _layer(128, 256, 4, 64, False, "float16")
    assert set(src.state_dict()) == {"qweight", "scales", "qzeros"}
    dst = QuantLinear(256, 128, bias=False, bits=4, group_size=64, sym=False).cuda()
    dst.load_state_dict(src.state_dict())
    x = _x(3, 256, torch.float16)
    assert torch.equal(dst(x), src(x))


def test_quant_linear_compiles_fullgraph_on_cuda() -> None:
    layer = _layer(512, 1024, 4, 128, False, "bfloat16")
    fn = torch.compile(layer, fullgraph=True)
    for m in (1, 4, 100):
        x = _x(m, 1024, torch.bfloat16)
        assert torch.equal(fn(x), layer(x))


def test_fp32_activations_say_once_that_they_leave_the_tensor_core_path(
    fresh_kernel_policy: object,
) -> None:
    layer = _layer(64, 128, 4, 64, False, "float16")
    assert layer.mma_qweight is not None
    with pytest.warns(KernelPathWarning, match="fp32 activations on CUDA"):
        layer(_x(2, 128, torch.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(_x(2, 128, torch.float32))  # once per process
        layer(_x(2, 128, torch.float16))  # the tensor-core path: nothing to say
