"""The randomized rotation: orthogonal, equal to its dense matrix, exact to invert, and
output-preserving for a linear layer."""

from __future__ import annotations

import pytest
import torch

from quantlab.transforms.rotation import (
    dct_matrix,
    hadamard_factors,
    hadamard_matrix,
    random_signs,
    rotate,
    rotate_hessian,
    rotation_factors,
    rotation_matrix,
    unrotate,
)

WIDTHS = (576, 1536, 192, 64, 100, 7, 1)


@pytest.mark.parametrize("width", WIDTHS)
def test_rotation_is_orthogonal_and_matches_its_matrix(width: int) -> None:
    signs = random_signs(width, 3)
    r = rotation_matrix(signs)
    eye = torch.eye(width, dtype=torch.float64)
    assert float((r @ r.t() - eye).abs().max()) < 1e-12
    x = torch.randn(5, width, dtype=torch.float64)
    assert float((rotate(x, signs) - x @ r.t()).abs().max()) < 1e-12
    assert float((unrotate(rotate(x, signs), signs) - x).abs().max()) < 1e-12
    # Incoherence: no entry of R is larger than sqrt(2 / K).
    assert float(r.abs().max()) <= (2.0 / width) ** 0.5 + 1e-12


@pytest.mark.parametrize("width", [4096, 3 * 8192])
def test_wide_rotations_invert_exactly(width: int) -> None:
    signs = random_signs(width, 4)
    x = torch.randn(3, width, dtype=torch.float64)
    y = rotate(x, signs)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-12)
    assert float((unrotate(y, signs) - x).abs().max()) < 1e-12


def test_factors_and_building_blocks() -> None:
    assert rotation_factors(576) == (9, 64)
    assert rotation_factors(1536) == (3, 512)
    assert hadamard_factors(512) == [8, 64]
    assert hadamard_factors(8192) == [2, 64, 64]
    assert hadamard_factors(1) == [1]
    c = dct_matrix(9)
    assert float((c @ c.t() - torch.eye(9, dtype=torch.float64)).abs().max()) < 1e-12
    h = hadamard_matrix(512)
    assert torch.allclose(h, torch.kron(hadamard_matrix(8), hadamard_matrix(64)))
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)
    with pytest.raises(ValueError, match="width must be >= 1"):
        random_signs(0, 0)


def test_signs_are_reproducible_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = random_signs(576, 11)
    after = torch.rand(1)
    assert torch.equal(before, after)
    assert torch.equal(a, random_signs(576, 11))
    assert not torch.equal(a, random_signs(576, 12))
    assert set(a.tolist()) == {-1, 1}


def test_rotated_layer_computes_the_same_output() -> None:
    torch.manual_seed(1)
    w = torch.randn(33, 576, dtype=torch.float64)
    x = torch.randn(7, 576, dtype=torch.float64)
    signs = random_signs(576, 5)
    y = rotate(x, signs) @ rotate(w, signs).t()
    assert float((y - x @ w.t()).abs().max()) < 1e-10


def test_hessian_rotation() -> None:
    torch.manual_seed(2)
    x = torch.randn(300, 192, dtype=torch.float64)
    h = x.t() @ x
    signs = random_signs(192, 0)
    r = rotation_matrix(signs)
    # The Hessian of the rotated inputs R x.
    xr = rotate(x, signs)
    assert float((rotate_hessian(h, signs) - r @ h @ r.t()).abs().max()) < 1e-9
    assert float((rotate_hessian(h, signs) - xr.t() @ xr).abs().max()) < 1e-9


def test_rotation_errors() -> None:
    signs = random_signs(64, 0)
    with pytest.raises(ValueError, match="last dimension must be 64"):
        rotate(torch.randn(2, 63), signs)
    with pytest.raises(TypeError, match="floating point"):
        rotate(torch.ones(2, 64, dtype=torch.int32), signs)
    with pytest.raises(ValueError, match="square"):
        rotate_hessian(torch.randn(64, 63), signs)
