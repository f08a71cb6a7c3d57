"""The ternary CUDA kernels (csrc/ternary/cuda_kernels.cu: the dp4a GEMV, the activation
fake-quantization, dequant and the i2 alignment) on the CPU emulation, under ASan + UBSan and
under TSan.

Inputs are prepared as csrc/bindings/ternary_cuda.cpp prepares them: scales as fp32 ``[1|N, 1|G]``;
a weight stored as tq1, or as i2 rows that are not a multiple of 16 bytes, is converted to aligned
i2 rows by the emulated ``ternary_to_aligned_i2`` kernel (checked byte for byte), and the GEMV
reads what that kernel wrote.

Exactness. The GEMV's arithmetic (ternary_reference.py) is BitNet's int8 activations, exact
integer group sums, ``y = fp32((sum_g acc_g s_g) / inv)``. With power-of-two scales (1/4 .. 2)
every fp32 partial sum is exact: on the grouped path each is a multiple of 1/4 of magnitude at
most 2 * 127 K < 2^22 digits for K <= 2112; on the per-tensor / per-row path the sum is an integer
(|sum| <= 127 K < 2^24 for K <= 26000) multiplied once by a power of two. So the only rounding is
the final division (and the cast to the output dtype): the oracle computes the sums in fp64 from
the reference's own int8 activations and rounds the quotient to fp32 once (an fp64 quotient of
two fp32 values, rounded to fp32, is the correctly rounded fp32 quotient), then to the output
dtype. Every output is compared bit for bit. Each batch mixes rows of three kinds (rows are
quantized independently):

* "int8": integers in [-127, 127] with a +-127: ``inv = 1`` and ``xq = x`` (every int8 value);
* "sign": ``{-1, 0, 1} * 2^e``: ``xq in {0, +-127}``, ``inv = 127 / 2^e``;
* "real": Gaussian values: the quantization rounds, reproduced bit for bit by the reference.

For int8 and sign rows the fp32 output is the exact value ``2^e sum_g s_g sum t x`` itself, so a
wrong trit at a column whose activation is non-zero (a change of the exact value by at least
``s_min 2^e = 2^(e-2)``) always changes the fp32 output; for real rows (K <= 2112) it changes
the sum by at least 2^-21 of the largest possible sum, above fp32's 2^-24 rounding. fp16 / bf16
outputs are the same values rounded once more (bit for bit too), where a large output can absorb
a one-trit change.
test_one_wrong_trit_changes_exactly_the_outputs_that_read_it shows the detection on the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from quantlab.formats import ternary_packing as tp
from quantlab.ops import ternary_reference as reference
from tests.emulation.emulator import DTYPE_CODE, Call, Emulator

pytestmark = pytest.mark.emulation

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROW_ALIGN = 16  # ternary::kCudaRowAlign


@dataclass
class Weight:
    t: torch.Tensor  # int8 trits [N, K]
    stored: torch.Tensor  # uint8 rows as the checkpoint stores them
    packing: str
    scales: torch.Tensor  # fp32 [1|N, 1|G]
    group: int

    @property
    def n(self) -> int:
        return self.t.shape[0]

    @property
    def k(self) -> int:
        return self.t.shape[1]

    @property
    def code(self) -> int:
        return 0 if self.packing == "i2" else 1


def aligned_row_bytes(k: int) -> int:
    """The binding's aligned i2 row width: ceil(ceil(K / 4) / 16) * 16."""
    return -(-tp.i2_row_bytes(k) // ROW_ALIGN) * ROW_ALIGN


def make_weight(
    n: int, k: int, group: int, packing: str, seed: int, extra_bytes: int = 0
) -> Weight:
    """Random trits and power-of-two scales (1/4 .. 2). i2 rows get ``extra_bytes`` of random
    bytes after ``ceil(K / 4)`` (the format allows wider rows) and random codes, 3 included, in
    the columns past K of their last byte: the kernels must read neither."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    scales = 2.0 ** torch.randint(-2, 2, tp.scale_shape(n, k, group), generator=gen).float()
    if packing == "tq1":
        stored = tp.pack_tq1(t)
    else:
        stored = tp.pack_i2(t)
        if k % 4:
            junk = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
            keep = (1 << (2 * (k % 4))) - 1
            stored[:, -1] = (stored[:, -1] & keep) | (junk & ~keep & 0xFF)
        if extra_bytes:
            pad = torch.randint(0, 256, (n, extra_bytes), generator=gen, dtype=torch.uint8)
            stored = torch.cat([stored, pad], dim=1)
    return Weight(t, stored.contiguous(), packing, scales, group)


def i2_aligned(t: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """What to_aligned_i2 must write: the trits as i2 rows of ``row_bytes``, padding code 1."""
    full = torch.zeros(t.shape[0], 4 * row_bytes, dtype=torch.int8)
    full[:, : t.shape[1]] = t
    return tp.pack_i2(full)


def conversion_call(w: Weight, row_bytes_out: int) -> Call:
    params = {
        "packing": w.code,
        "row_bytes_in": w.stored.shape[1],
        "n": w.n,
        "k": w.k,
        "row_bytes_out": row_bytes_out,
    }
    return Call(
        "ternary_to_aligned_i2",
        params,
        {"qweight": w.stored},
        {"out": (torch.uint8, (w.n, row_bytes_out))},
    )


def prepare(emulator: Emulator, weights: list[Weight]) -> list[tuple[torch.Tensor, int]]:
    """The binding's preparation for the GEMV: (i2 rows, row bytes) per weight. Stored aligned
    i2 rows are used as they are; others go through the emulated ``ternary_to_aligned_i2``,
    whose output must be the aligned i2 encoding of the trits, byte for byte."""
    todo = [
        i for i, w in enumerate(weights) if w.packing != "i2" or w.stored.shape[1] % ROW_ALIGN != 0
    ]
    prepared = [(w.stored, w.stored.shape[1]) for w in weights]
    if todo:
        calls = [conversion_call(weights[i], aligned_row_bytes(weights[i].k)) for i in todo]
        for i, out in zip(todo, emulator.run(calls), strict=True):
            rb = aligned_row_bytes(weights[i].k)
            assert torch.equal(out["out"], i2_aligned(weights[i].t, rb)), i
            prepared[i] = (out["out"], rb)
    return prepared


def activations(m: int, k: int, dtype: torch.dtype, seed: int, nan_row: int = -1) -> torch.Tensor:
    """Rows of the three kinds of the module docstring, cycling from ``seed % 3``; ``nan_row``
    (if any) holds a NaN and an Inf."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(m):
        kind = (i + seed) % 3
        j = int(torch.randint(0, k, (1,), generator=gen))
        if kind == 0:
            r = torch.randint(-127, 128, (k,), generator=gen).double()
            r[j] = -127.0 if i % 2 else 127.0
        elif kind == 1:
            e = (-3, 0, 2)[i % 3]
            r = torch.randint(-1, 2, (k,), generator=gen).double() * 2.0**e
            r[j] = 2.0**e
        else:
            r = torch.randn(k, generator=gen, dtype=torch.float64) * 3
        if i == nan_row:
            r[j] = float("nan")
            r[(j + 1) % k] = float("inf")
        rows.append(r)
    return torch.stack(rows).to(dtype)


def gemv_oracle(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """``fp32((sum_g acc_g s_g) / inv)`` in x's dtype; rows with a NaN/Inf are NaN."""
    xq, inv = reference.quantize_activations(x)
    m, (n, k) = x.shape[0], w.t.shape
    groups = w.scales.shape[1]
    acc = torch.einsum(
        "mgc,ngc->mng",
        xq.double().view(m, groups, k // groups),
        w.t.double().view(n, groups, k // groups),
    )
    y = (acc * w.scales.double().unsqueeze(0)).sum(-1) / inv.double().unsqueeze(1)
    y = y.float()
    y[~torch.isfinite(x.float()).all(dim=1)] = float("nan")
    return y.to(x.dtype)


def gemv_call(w: Weight, qweight: torch.Tensor, row_bytes: int, x: torch.Tensor) -> Call:
    params = {
        "n": w.n,
        "k": w.k,
        "row_bytes": row_bytes,
        "group_size": w.group,
        "m": x.shape[0],
        "dtype": DTYPE_CODE[x.dtype],
    }
    return Call(
        "ternary_gemv",
        params,
        {"qweight": qweight, "scales": w.scales, "x": x},
        {"y": (x.dtype, (x.shape[0], w.n))},
    )


def assert_bits(y: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Bit-for-bit equality (NaN: both NaN, whatever the payload)."""
    assert y.dtype == want.dtype and y.shape == want.shape, what
    nan = torch.isnan(want.float())
    assert torch.equal(torch.isnan(y.float()), nan), f"{what}: NaN placement differs"
    bits = torch.int32 if y.dtype == torch.float32 else torch.int16
    if y.dtype == torch.uint8:
        bits = torch.uint8
    bad = ((y.view(bits) != want.view(bits)) & ~nan).nonzero().tolist()
    assert not bad, (
        f"{what}: {len(bad)} outputs differ, first at {bad[0]}: "
        f"{y[tuple(bad[0])].item()} != {want[tuple(bad[0])].item()}"
    )


# ---- conversion, dequant, activation quantization -------------------------------------------


# (n, k, packing, extra stored bytes, group): i2 rows of exactly ceil(K / 4) bytes and wider
# ones, K % 4 != 0 (junk codes past K), tq1 with K % 5 != 0, every granularity the dequant takes
# (per tensor, per row, groups of 32, groups that are no power of two).
LAYOUTS = [
    (7, 100, "i2", 0, -1),
    (5, 101, "i2", 9, 0),
    (6, 96, "tq1", 0, 32),
    (4, 123, "tq1", 0, 41),
    (3, 257, "i2", 0, -1),
    (2, 260, "tq1", 0, 20),
]


def test_alignment_and_dequant_are_exact(emulator: Emulator) -> None:
    """to_aligned_i2 (minimal and wider output rows) writes the aligned encoding of the trits;
    dequant (i2 rows of any width, tq1) writes ``s * t`` (exact in fp32, rounded once)."""
    weights = [make_weight(n, k, g, p, seed=n + k, extra_bytes=e) for n, k, p, e, g in LAYOUTS]
    calls, wants = [], []
    for w in weights:
        # Any fp16 scales (the dequant is exact for every scale): 0.5 .. 1.5 as in the GPU tests.
        gen = torch.Generator().manual_seed(w.n)
        w.scales = (torch.rand(w.scales.shape, generator=gen) + 0.5).half().float()
        for rb in (aligned_row_bytes(w.k), aligned_row_bytes(w.k) + ROW_ALIGN):
            calls.append(conversion_call(w, rb))
            wants.append(i2_aligned(w.t, rb))
        dense = reference.ternary_dequant(
            w.stored[:, : tp.packed_row_bytes(w.packing, w.k)],
            w.scales,
            w.packing,
            w.k,
            w.group,
            torch.float64,
        )
        assert torch.equal(
            dense,
            w.t.double() * w.scales.double().repeat_interleave(w.k // w.scales.shape[1], dim=1),
        )
        for dt in DTYPES:
            params = {
                "packing": w.code,
                "row_bytes": w.stored.shape[1],
                "n": w.n,
                "k": w.k,
                "group_size": w.group,
                "dtype": DTYPE_CODE[dt],
            }
            calls.append(
                Call(
                    "ternary_dequant",
                    params,
                    {"qweight": w.stored, "scales": w.scales},
                    {"out": (dt, (w.n, w.k))},
                )
            )
            wants.append(dense.to(dt))
    for i, (out, want) in enumerate(zip(emulator.run(calls), wants, strict=True)):
        assert_bits(next(iter(out.values())), want, f"call {i} ({calls[i].op})")


def test_fake_quantize_is_bitnets_int8(emulator: Emulator) -> None:
    """``xq / inv`` per row (the large-batch path's activations), bit for bit; a row with a NaN
    or an Inf is all NaN, an all-zero row (absmax clamped to 1e-5) is zero."""
    calls, wants = [], []
    for dt, (m, k) in zip(DTYPES + (torch.float32,), [(5, 300)] * 3 + [(2, 40)], strict=True):
        x = activations(m, k, dt, seed=k + DTYPE_CODE[dt], nan_row=1 if m > 2 else -1)
        x[-1] = 0
        if m > 3:
            x[2, 7] = 1e-7  # a tiny row: absmax below the clamp
            x[2, :7] = 0
            x[2, 8:] = 0
        xq, inv = reference.quantize_activations(x)
        want = (xq.double() / inv.double().unsqueeze(1)).float()
        want[~torch.isfinite(x.float()).all(dim=1)] = float("nan")
        calls.append(
            Call(
                "ternary_fake_quantize",
                {"m": m, "k": k, "dtype": DTYPE_CODE[dt]},
                {"x": x},
                {"out": (dt, (m, k))},
            )
        )
        wants.append(want.to(dt))
    for out, want in zip(emulator.run(calls), wants, strict=True):
        assert_bits(out["out"], want, str(want.dtype))


# ---- the fused GEMV -------------------------------------------------------------------------

# (n, k, group, stored packing, m). Rows per CTA: 32 with 8 lanes per row (K < 2048), 8 with 32
# lanes (row_bytes / 16 >= 32); every N leaves the last CTA (or its last pass) partly inactive.
# Groups of 32 with K % 64 == 32 (the last chunk's second half skipped), 64, 128, per row, per
# tensor; K % 4 != 0 and K % 64 != 0 (zero activations in the padded columns); tq1 and unaligned
# i2 converted, aligned i2 read as stored (with junk codes past K); every batch size 1..8 (one
# template each) and 11 (two launches of 8 and 3).
GEMV_CASES = [
    (45, 96, 32, "i2", 3),
    (40, 200, -1, "tq1", 5),
    (37, 101, 0, "i2", 8),
    (33, 256, 64, "i2", 2),
    (20, 384, 128, "tq1", 4),
    (16, 63, 0, "i2", 7),
    (50, 160, 32, "i2", 6),
    (9, 2112, 32, "i2", 1),
    (7, 2050, -1, "tq1", 2),
]


@pytest.fixture(scope="module")
def gemv_weights(emulator: Emulator) -> dict[tuple, tuple[Weight, torch.Tensor, int]]:
    """The cases' weights, prepared as the binding prepares them (one conversion run)."""
    weights = [make_weight(n, k, g, p, seed=7 * n + k) for n, k, g, p, _ in GEMV_CASES]
    prepared = prepare(emulator, weights)
    return {
        case: (w, q, rb) for case, w, (q, rb) in zip(GEMV_CASES, weights, prepared, strict=True)
    }


@pytest.mark.parametrize(
    "case", GEMV_CASES, ids=[f"{n}x{k}-g{g}-{p}-m{m}" for n, k, g, p, m in GEMV_CASES]
)
def test_gemv_is_the_exact_w158a8_product(
    emulator: Emulator, gemv_weights: dict, case: tuple
) -> None:
    n, k, group, packing, m = case
    w, qweight, row_bytes = gemv_weights[case]
    assert (packing == "i2" and tp.i2_row_bytes(k) % ROW_ALIGN == 0) == (qweight is w.stored)
    xs = [
        activations(m, k, dt, seed=m + DTYPE_CODE[dt], nan_row=1 if m >= 3 else -1) for dt in DTYPES
    ]
    if (n, k) == (16, 63):  # and 11 rows: launches of 8 and 3 (x and y offset by 8 rows)
        xs.append(activations(11, k, torch.float32, seed=11, nan_row=9))
    calls = [gemv_call(w, qweight, row_bytes, x) for x in xs]
    for x, out in zip(xs, emulator.run(calls), strict=True):
        assert_bits(out["y"], gemv_oracle(x, w), f"{x.dtype} m={x.shape[0]}")


def test_one_wrong_trit_changes_exactly_the_outputs_that_read_it(plain_emulator: Emulator) -> None:
    """The checks above can fail: one trit of a tq1 weight changed (through conversion, GEMV and
    dequant) changes exactly the outputs that read it, and nothing else."""
    n, k, row, col = 40, 200, 17, 123
    w = make_weight(n, k, -1, "tq1", seed=3)
    t_bad = w.t.clone()
    t_bad[row, col] = 1 if w.t[row, col] != 1 else -1
    bad = Weight(t_bad, tp.pack_tq1(t_bad), "tq1", w.scales, w.group)
    (q_good, rb), (q_bad, _) = prepare(plain_emulator, [w, bad])
    x = activations(3, k, torch.float32, seed=0)  # an int8, a sign and a real row
    x[:, col] = torch.tensor([5.0, 1.0, 0.7])  # each reads the changed trit
    dq = {"packing": 1, "row_bytes": w.stored.shape[1], "n": n, "k": k, "group_size": w.group}
    dq["dtype"] = 0
    outs = plain_emulator.run(
        [
            gemv_call(w, q_good, rb, x),
            gemv_call(bad, q_bad, rb, x),
            Call(
                "ternary_dequant",
                dq,
                {"qweight": bad.stored, "scales": w.scales},
                {"out": (torch.float32, (n, k))},
            ),
        ]
    )
    want = gemv_oracle(x, w)
    assert_bits(outs[0]["y"], want)
    assert (outs[1]["y"] != want).nonzero().tolist() == [[i, row] for i in range(3)]
    dense = reference.ternary_dequant(w.stored, w.scales, "tq1", k, w.group, torch.float32)
    assert (outs[2]["out"] != dense).nonzero().tolist() == [[row, col]]


def test_gemv_grid_stride_and_shared_memory_split(plain_emulator: Emulator) -> None:
    """Two paths too slow for the sanitized runners (ASan costs ~0.1 s per 256-thread CTA here),
    on the uninstrumented one, bit for bit: more rows than 2 * 132 CTAs take in one pass (the
    grid-stride loop over rows), and K = 26000 at 8 rows, whose shared memory (72 B per row and
    16 columns) exceeds the 227 KiB opt-in: launches of 7 and 1 rows, the first one with the
    cudaFuncSetAttribute opt-in (> 48 KiB)."""
    wide = make_weight(8500, 64, 0, "i2", seed=1)
    deep = make_weight(9, 26000, -1, "i2", seed=2)
    (q_wide, rb_wide), (q_deep, rb_deep) = prepare(plain_emulator, [wide, deep])
    x_wide = activations(2, 64, torch.bfloat16, seed=4)
    x_deep = activations(8, 26000, torch.float16, seed=5, nan_row=6)
    out_wide, out_deep = plain_emulator.run(
        [gemv_call(wide, q_wide, rb_wide, x_wide), gemv_call(deep, q_deep, rb_deep, x_deep)]
    )
    assert_bits(out_wide["y"], gemv_oracle(x_wide, wide), "grid stride")
    assert_bits(out_deep["y"], gemv_oracle(x_deep, deep), "shared-memory split")
