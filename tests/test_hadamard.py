"""Hadamard matrices (transforms/hadamard.py): Sylvester x Paley I / II, built here, and the block-diagonal
fallback; the online rotation uses them."""
from __future__ import annotations

import numpy as np
import pytest

from qronos_onnx.transforms.hadamard import (block_hadamard, hadamard_blocks, hadamard_matrix, is_hadamard_size)
from qronos_onnx.transforms.online import rotation_matrix


def _check_true_hadamard(H, n):
    assert H.shape == (n, n) and H.dtype == np.float64
    np.testing.assert_allclose(H @ H.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(H), np.full((n, n), 1 / np.sqrt(n)), atol=1e-15)


# 12 = Paley I (q = 11) or II (q = 5); 20 = Paley I (19); 28 = Paley II (13); 36 = Paley II (17); 52 = Paley II
# over GF(25) (a prime power, not a prime); 44, 60, 108 = Paley I; 576 = 16 * 36 and 1536 = 128 * 12 are SmolLM2's
# widths; 64 and 2048 pure Sylvester; 40 = 2 * 20
@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 40, 44, 52, 60, 108, 576, 1536, 64, 2048])
def test_true_hadamard_orthonormal_with_entries_one_over_sqrt_n(n):
    assert is_hadamard_size(n)
    _check_true_hadamard(hadamard_matrix(n), n)


@pytest.mark.parametrize("n", [12, 36, 576])
def test_random_signs_keep_a_hadamard_and_follow_the_seed(n):
    H = hadamard_matrix(n, seed=3)
    _check_true_hadamard(H, n)
    np.testing.assert_array_equal(H, hadamard_matrix(n, seed=3))
    assert not np.array_equal(H, hadamard_matrix(n, seed=4))
    # the signs act on rows: |H| unchanged, and each row is +- the deterministic row
    np.testing.assert_allclose(np.abs((H * hadamard_matrix(n)).sum(1)), np.ones(n), atol=1e-12)


@pytest.mark.parametrize("n", [3, 6, 10, 17, 156, 172])
def test_sizes_without_a_construction_are_refused_by_hadamard_matrix(n):
    assert not is_hadamard_size(n)
    with pytest.raises(ValueError, match="block_hadamard"):
        hadamard_matrix(n)


@pytest.mark.parametrize("n, blocks", [(17, [16, 1]), (156, [152, 4]), (50, [48, 2]), (6, [2, 2, 2]), (576, [576])])
def test_block_hadamard_is_block_diagonal_and_orthonormal(n, blocks):
    assert hadamard_blocks(n) == blocks
    H = block_hadamard(n, seed=1)
    np.testing.assert_allclose(H @ H.T, np.eye(n), atol=1e-12)
    i = 0
    for b in blocks:
        block = H[i : i + b, i : i + b]
        np.testing.assert_allclose(np.abs(block), np.full((b, b), 1 / np.sqrt(b)), atol=1e-15)
        assert not H[i : i + b, :i].any() and not H[i : i + b, i + b :].any()  # nothing outside its block
        i += b


def test_online_rotation_is_the_randomized_true_hadamard_when_one_exists():
    for n in (12, 96, 576):
        R = rotation_matrix(n, seed=0)
        _check_true_hadamard(R, n)
    R = rotation_matrix(17, seed=0)
    np.testing.assert_allclose(np.abs(R[:16, :16]), np.full((16, 16), 0.25), atol=1e-15)
    assert abs(abs(R[16, 16]) - 1) < 1e-15
