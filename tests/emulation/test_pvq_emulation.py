"""The PVQ CUDA kernels (csrc/pvq/cuda_kernels.cu: decode and the warp-per-row decode-GEMV) on
the CPU emulation, under ASan + UBSan and under TSan.

Inputs are what csrc/bindings/pvq_cuda.cpp hands the kernels: the int32 code stream as it is
stored, row scales and levels (fp16 on disk) converted to fp32; the runner builds the count
table with the same host function (fill_counts) the binding uses.

Decode: the kernels compute every weight with the reference's fp32 operations in its order
(``g = s * level``, ``r = g / sqrt(sum y^2)``, ``w = y * r``), so the decode must equal
ops/pvq_reference.py's bit for bit, on any data (here random codes over the whole range, random
fp16 scales and levels, some corrupt codes, which decode to zeros).

GEMV exactness: the lanes' fmaf chains and the shuffle tree round in an order the reference does
not model, so the exact test uses data whose sums are exact in any order: pyramid points whose
``sum y^2`` is a perfect square ``s^2`` with odd part of ``s`` dividing Q (105, or 1225 for the
63-bit encoding), levels ``Q * c`` (c in 1/4 steps) and power-of-two row scales, so
``r = g / s`` and every weight ``y r`` is a short dyadic, and x in ``{-1, 0, 1} * 2^e``. The test
checks, from the data, that every output's ``sum |w x|`` divided by the finest binary digit of
any ``w x`` is below 2^24: then every fp32 partial sum is exact, and each output must be the
fp64 product rounded once to the output dtype, bit for bit. A wrong code changes some weights of
its vector by at least that digit, so (x non-zero there) it changes the exact fp32 output.
"""

from __future__ import annotations

import functools

import pytest
import torch

from quantlab.formats.bitstream import pack_fields
from quantlab.formats.pvq_codebook import code_bits, pyramid_size, rank_batch, unrank_batch
from quantlab.ops import pvq_reference as reference
from tests.emulation.emulator import DTYPE_CODE, Call, Emulator, assert_bits

pytestmark = pytest.mark.emulation

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Packed:
    """One packed layer: codes (the vector codes, int64) and the tensors the runner reads."""

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        levels: torch.Tensor,
        n: int,
        k: int,
        dim: int,
        pulses: int,
    ) -> None:
        self.codes, self.n, self.k, self.dim, self.pulses = codes, n, k, dim, pulses
        self.bits = code_bits(dim, pulses, levels.numel())
        self.words = pack_fields(codes, self.bits)
        self.scales, self.levels = scales, levels  # fp16, as stored

    @property
    def limit(self) -> int:
        return pyramid_size(self.dim, self.pulses) * self.levels.numel()

    def call(self, op: str, dtype: torch.dtype, x: torch.Tensor | None = None) -> Call:
        params = {
            "n_words": self.words.numel(),
            "n_levels": self.levels.numel(),
            "n": self.n,
            "k": self.k,
            "dim": self.dim,
            "pulses": self.pulses,
            "code_bits": self.bits,
            "dtype": DTYPE_CODE[dtype],
        }
        inputs = {
            "codes": self.words,
            "row_scales": self.scales.float(),  # the binding's .to(kFloat)
            "levels": self.levels.float(),
        }
        if x is None:
            return Call(op, params, inputs, {"out": (dtype, (self.n, self.k))})
        params["m"] = x.shape[0]
        inputs["x"] = x
        return Call(op, params, inputs, {"y": (dtype, (x.shape[0], self.n))})

    def decoded(self) -> torch.Tensor:
        """The reference decode in fp32; corrupt codes (level >= L) give zero vectors."""
        corrupt = self.codes >= self.limit
        valid = pack_fields(torch.where(corrupt, 0, self.codes), self.bits)
        w = reference.pvq_decode(
            valid, self.scales, self.levels, self.dim, self.pulses, self.k, torch.float32
        )
        w = w.view(self.n, self.k // self.dim, self.dim)
        w[corrupt.view(self.n, -1)] = 0
        return w.view(self.n, self.k)


def random_packed(n: int, k: int, dim: int, pulses: int, n_levels: int, seed: int) -> Packed:
    """Codes over the whole valid range, random fp16 scales and ascending levels, and about one
    code in 16 corrupt (>= N(D, P) L, when the code width leaves room)."""
    gen = torch.Generator().manual_seed(seed)
    limit = pyramid_size(dim, pulses) * n_levels
    count = n * (k // dim)
    codes = (torch.rand(count, generator=gen, dtype=torch.float64) * limit).long()
    codes = codes.clamp(0, limit - 1)
    room = (1 << code_bits(dim, pulses, n_levels)) - limit
    if room > 0:
        corrupt = torch.rand(count, generator=gen) < 1 / 16
        extra = (torch.rand(count, generator=gen, dtype=torch.float64) * room).long()
        codes = torch.where(corrupt, limit + extra.clamp(0, room - 1), codes)
    scales = (torch.rand(n, generator=gen) + 0.5).half()
    levels = torch.sort(torch.rand(n_levels, generator=gen) * 2 + 0.1).values.half()
    return Packed(codes, scales, levels, n, k, dim, pulses)


def _odd_part(s: torch.Tensor) -> torch.Tensor:
    return s // (s & -s)


@functools.cache
def square_norm_indices(dim: int, pulses: int, q: int, count: int, seed: int) -> torch.Tensor:
    """``count`` random pyramid indices whose points have ``sum y^2 = s^2``, odd part of s | q."""
    size = pyramid_size(dim, pulses)
    gen = torch.Generator().manual_seed(seed)
    if (dim, pulses) == (10, 245):
        # Sampling finds none: points with one +-245 (s = 245) or a +-105, +-140 pair (s = 175).
        points = torch.zeros(count, dim, dtype=torch.int64)
        for i in range(count):
            pos = torch.randperm(dim, generator=gen)[:2]
            sgn = torch.randint(0, 2, (2,), generator=gen) * 2 - 1
            if i % 3 == 0:
                points[i, pos[0]] = 245 * sgn[0]
            else:
                points[i, pos] = torch.tensor([105, 140]) * sgn

        return rank_batch(points, pulses)
    found = torch.empty(0, dtype=torch.int64)
    while found.numel() < count:
        idx = (torch.rand(20000, generator=gen, dtype=torch.float64) * size).long()
        idx = idx.clamp(0, size - 1)
        y = unrank_batch(idx, dim, pulses).long()
        yy = (y * y).sum(1)
        s = yy.double().sqrt().round().long()
        keep = (s * s == yy) & (q % _odd_part(s) == 0)
        found = torch.cat([found, idx[keep]])
    return found[:count]


def exact_packed(
    n: int, k: int, dim: int, pulses: int, n_levels: int, seed: int, corrupt: int = 0
) -> Packed:
    """The GEMV's exact data (module docstring); ``corrupt`` codes past the limit."""
    q = 1225 if (dim, pulses) == (10, 245) else 105
    gen = torch.Generator().manual_seed(seed)
    count = n * (k // dim)
    index = square_norm_indices(dim, pulses, q, count, seed)
    index = index[torch.randperm(count, generator=gen)]
    level = torch.randint(0, n_levels, (count,), generator=gen)
    codes = level * pyramid_size(dim, pulses) + index
    levels = (q * (torch.arange(n_levels) % 4 + 4) / 4).half()  # Q, 5Q/4, 3Q/2, 7Q/4, Q, ...
    assert bool((levels.double() == q * (torch.arange(n_levels) % 4 + 4) / 4).all())
    scales = (2.0 ** torch.randint(-1, 2, (n,), generator=gen)).half()
    packed = Packed(codes, scales, levels, n, k, dim, pulses)
    if corrupt:
        room = (1 << packed.bits) - packed.limit
        assert room > 0
        packed.codes[torch.randperm(count, generator=gen)[:corrupt]] = packed.limit + room // 2
        packed.words = pack_fields(packed.codes, packed.bits)
    return packed


def sign_activations(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (m, k), generator=gen).double()
    return (x * 2.0 ** torch.randint(-2, 3, (m, 1), generator=gen)).to(dtype)


def finest_digit(t: torch.Tensor) -> float:
    """The smallest power of two of which some non-zero entry of ``t`` is an odd multiple."""
    t = t.double().flatten()
    t = t[t != 0]
    mantissa, exponent = torch.frexp(t)
    integer = (mantissa * 2.0**53).long()
    low = (integer & -integer).double() * 2.0 ** (exponent - 53).double()
    return float(low.min())


def assert_exact_in_fp32(x: torch.Tensor, w: torch.Tensor) -> None:
    """Every partial sum of every output is a multiple of the finest digit and at most
    sum |w x| in magnitude: below 2^24 digits, fp32 holds it exactly."""
    digit = finest_digit(w) * finest_digit(x)
    worst = float((x.double().abs() @ w.double().abs().t()).max()) / digit
    assert worst < 2.0**24, f"sums not exact in fp32: {worst:.3g} digits"


# (n, k, dim, pulses, levels): 8- to 63-bit codes (fields within one word, across two, across
# three), count tables larger than the 256 threads that load them (16 x 28: 493 entries,
# 10 x 245: 2706), dim 64 (the kernels' largest), odd dims, one level (and corrupt codes where
# the width leaves room).
DECODE_CASES = [
    (5, 96, 16, 28, 6),
    (7, 100, 4, 9, 3),
    (3, 120, 10, 245, 1),
    (9, 80, 2, 40, 2),
    (2, 128, 64, 6, 2),
    (6, 40, 5, 7, 1),
]


def test_decode_is_the_reference(emulator: Emulator) -> None:
    calls, wants, corrupt = [], [], 0
    for n, k, dim, pulses, n_levels in DECODE_CASES:
        packed = random_packed(n, k, dim, pulses, n_levels, seed=n * k + dim)
        corrupt += int((packed.codes >= packed.limit).sum())
        w = packed.decoded()
        for dt in DTYPES:
            calls.append(packed.call("pvq_decode", dt))
            wants.append(w.to(dt))
    assert corrupt > 0
    for i, (out, want) in enumerate(zip(emulator.run(calls), wants, strict=True)):
        assert_bits(out["out"], want, f"call {i}")


# (n, k, dim, pulses, levels, m, corrupt codes): every batch size 1..8 (one template each);
# N not a multiple of the 8 rows (warps) of a CTA (warps past N exit after the table load);
# fewer vectors per row than the 32 lanes, and several per lane (k 1280 / 4 = 320 vectors).
GEMV_CASES = [
    (13, 64, 8, 8, 3, 1, 0),
    (9, 1280, 4, 9, 3, 2, 0),
    (16, 96, 16, 16, 2, 3, 2),
    (8, 160, 5, 7, 1, 4, 0),
    (11, 200, 2, 40, 2, 5, 1),
    (7, 128, 16, 28, 6, 6, 0),
    (12, 120, 10, 245, 1, 7, 1),
    (20, 64, 8, 8, 4, 8, 0),
]


@pytest.mark.parametrize(
    "case", GEMV_CASES, ids=[f"{c[0]}x{c[1]}-d{c[2]}p{c[3]}-m{c[5]}" for c in GEMV_CASES]
)
def test_gemv_is_exact(emulator: Emulator, case: tuple) -> None:
    n, k, dim, pulses, n_levels, m, corrupt = case
    packed = exact_packed(n, k, dim, pulses, n_levels, seed=n + k, corrupt=corrupt)
    w = packed.decoded().double()
    calls, wants = [], []
    for dt in DTYPES:
        x = sign_activations(m, k, dt, seed=m + DTYPE_CODE[dt])
        assert_exact_in_fp32(x, w)
        calls.append(packed.call("pvq_gemv", dt, x))
        wants.append((x.double() @ w.t()).to(dt))
    for out, want in zip(emulator.run(calls), wants, strict=True):
        assert_bits(out["y"], want, str(want.dtype))


def test_gemv_with_random_codes_is_within_its_rounding_bound(emulator: Emulator) -> None:
    """Random codes, scales, levels and Gaussian x: each lane's fmaf chain (D per vector, at
    most ceil(K / D / 32) vectors) and 5 shuffle additions bound an output's error by
    ``n 2^-24 sum|w x| + 2^-p |y|`` (n = D ceil(K / D / 32) + 5; p = 24, 11, 8 for fp32, fp16,
    bf16). Here n <= 85: 5e-6 sum|w x|, while a wrong code moves an output by about
    |w| |x| ~ 0.3 of sum|w x| / sqrt(K / D)."""
    calls, cases = [], []
    for n, k, dim, pulses, n_levels, m in [(10, 96, 16, 28, 6, 3), (9, 1280, 4, 9, 3, 8)]:
        packed = random_packed(n, k, dim, pulses, n_levels, seed=k)
        w = packed.decoded().double()
        for dt in DTYPES:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dt)
            calls.append(packed.call("pvq_gemv", dt, x))
            cases.append((x, w, dim * -(-k // dim // 32) + 5))
    for out, (x, w, n_round) in zip(emulator.run(calls), cases, strict=True):
        y = x.double() @ w.t()
        p = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}[x.dtype]
        bound = n_round * 2.0**-24 * (x.double().abs() @ w.abs().t()) * 1.01
        bound += y.abs() * 2.0**-p + 2.0**-24
        err = (out["y"].double() - y).abs()
        assert bool((err <= bound).all()), f"{x.dtype}: worst {float((err / bound).max()):.2f}"


def test_one_wrong_code_changes_exactly_the_outputs_that_read_it(
    plain_emulator: Emulator,
) -> None:
    """The checks above can fail: one code (row 5, vector 3) replaced by its neighbour index
    changes exactly that row's GEMV outputs and that vector's decoded weights."""
    n, k, dim, pulses, n_levels, m, row, vec = 13, 64, 8, 8, 3, 3, 5, 3
    packed = exact_packed(n, k, dim, pulses, n_levels, seed=1)
    j = row * (k // dim) + vec
    bad_codes = packed.codes.clone()
    bad_codes[j] = (bad_codes[j] + 1) % packed.limit
    bad = Packed(bad_codes, packed.scales, packed.levels, n, k, dim, pulses)
    w_good, w_bad = packed.decoded(), bad.decoded()
    changed = (w_good != w_bad).nonzero().tolist()
    assert changed and all(r == row and c // dim == vec for r, c in changed)
    x = sign_activations(m, k, torch.float32, seed=3)
    x[:, vec * dim : (vec + 1) * dim] = 1
    want = x.double() @ w_good.double().t()
    assert bool((x.double() @ w_bad.double().t() != want)[:, row].all())
    good_y, bad_y, bad_w = plain_emulator.run(
        [
            packed.call("pvq_gemv", torch.float32, x),
            bad.call("pvq_gemv", torch.float32, x),
            bad.call("pvq_decode", torch.float32),
        ]
    )
    assert_bits(good_y["y"], want.float())
    assert (bad_y["y"] != want.float()).nonzero().tolist() == [[i, row] for i in range(m)]
    assert (bad_w["out"] != w_good).nonzero().tolist() == changed
