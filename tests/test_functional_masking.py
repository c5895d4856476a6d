"""Property-based tests of block masks and apply_mask."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from yolozu.functional import masking, rng
from yolozu.tta import ttt_mim

shapes = st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40), st.integers(1, 9))
probs = st.floats(0.0, 1.0)
seeds = st.integers(0, 2**32)


@given(shapes, probs, seeds)
def test_shape_dtype_and_constant_within_each_cell(shape, prob, seed):
    batch, height, width, patch = shape
    mask = masking.block_mask(rng.key(seed), batch, height, width, patch_size=patch, mask_prob=prob)
    assert mask.shape == (batch, 1, height, width)
    assert mask.dtype == torch.bool
    for top in range(0, height, patch):
        for left in range(0, width, patch):
            cell = mask[:, 0, top : top + patch, left : left + patch]
            first = cell[:, :1, :1]
            assert torch.equal(cell, first.expand_as(cell))


@given(shapes, seeds)
def test_prob_zero_masks_nothing_and_one_everything(shape, seed):
    batch, height, width, patch = shape
    k = rng.key(seed)
    assert not masking.block_mask(k, batch, height, width, patch_size=patch, mask_prob=0.0).any()
    assert masking.block_mask(k, batch, height, width, patch_size=patch, mask_prob=1.0).all()


@given(shapes, probs, seeds)
def test_same_key_same_mask(shape, prob, seed):
    batch, height, width, patch = shape
    first = masking.block_mask(rng.key(seed), batch, height, width, patch_size=patch, mask_prob=prob)
    torch.randn(100)  # global RNG traffic must not matter
    second = masking.block_mask(rng.key(seed), batch, height, width, patch_size=patch, mask_prob=prob)
    assert torch.equal(first, second)


@given(st.integers(1, 4), st.integers(8, 64), st.integers(1, 8), st.floats(0.05, 0.95), seeds)
def test_masked_fraction_within_binomial_bounds(batch, size, patch, prob, seed):
    grid = masking.block_grid(batch, size, size, patch_size=patch, mask_prob=prob, gen=rng.generator(rng.key(seed)))
    n = grid.numel()
    masked = int(grid.sum())
    sigma = math.sqrt(n * prob * (1 - prob))
    assert abs(masked - n * prob) <= 6 * sigma + 1


def test_different_images_of_a_batch_get_different_masks():
    mask = masking.block_mask(rng.key(3), 8, 64, 64, patch_size=8, mask_prob=0.5)
    assert len({tuple(m.flatten().tolist()) for m in mask}) == 8


@given(shapes, probs, seeds, st.floats(-3.0, 0.5))
def test_apply_mask_changes_exactly_the_masked_pixels(shape, prob, seed, mask_value):
    batch, height, width, patch = shape
    mask = masking.block_mask(rng.key(seed), batch, height, width, patch_size=patch, mask_prob=prob)
    x = 1.0 + torch.rand(batch, 3, height, width, generator=rng.generator(rng.key(seed + 1)))
    out = masking.apply_mask(x, mask, mask_value)
    changed = out != x
    assert torch.equal(changed, mask.expand_as(x))
    assert torch.all(out[changed] == torch.tensor(mask_value, dtype=x.dtype))
    assert torch.equal(x, 1.0 + torch.rand(batch, 3, height, width, generator=rng.generator(rng.key(seed + 1))))


def test_compat_generate_block_mask_uses_its_generator():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = ttt_mim.generate_block_mask(20, 30, patch_size=4, mask_prob=0.5, generator=g1)
    b = ttt_mim.generate_block_mask(20, 30, patch_size=4, mask_prob=0.5, generator=g2)
    assert a.shape == (20, 30) and a.dtype == torch.bool and torch.equal(a, b)
    x = torch.ones(2, 3, 20, 30)
    assert torch.equal(ttt_mim.apply_mask(x, a, mask_value=0.0) == 0, a.expand_as(x))


def test_bad_mask_arguments_are_errors():
    import pytest

    with pytest.raises(ValueError, match="mask_prob"):
        masking.block_mask(rng.key(0), 1, 8, 8, patch_size=4, mask_prob=1.5)
    with pytest.raises(ValueError, match="patch_size"):
        masking.block_mask(rng.key(0), 1, 8, 8, patch_size=0, mask_prob=0.5)


cell_shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 20), st.integers(1, 20), st.integers(2, 7))


@given(cell_shapes, seeds)
def test_standardise_cells_standardises_each_cell_on_its_own(shape, seed):
    batch, channels, height, width, patch = shape
    x = torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))
    out = masking.standardise_cells(x, patch)
    assert out.shape == x.shape
    for top in range(0, height, patch):
        for left in range(0, width, patch):
            cell = x[:, :, top : top + patch, left : left + patch]
            mean = cell.mean(dim=(1, 2, 3), keepdim=True)
            var = cell.var(dim=(1, 2, 3), keepdim=True) if cell[0].numel() > 1 else torch.zeros_like(mean)
            expected = (cell - mean) / (var + 1e-6).sqrt()
            got = out[:, :, top : top + patch, left : left + patch]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@given(st.integers(1, 30), st.integers(1, 30), st.integers(2, 8), seeds)
def test_standardised_cells_ignore_each_cells_brightness_and_contrast(height, width, patch, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, height, width, generator=gen)
    cells = (2, 1, math.ceil(height / patch), math.ceil(width / patch))
    gain = masking.expand_grid(0.2 + torch.rand(cells, generator=gen), height, width, patch)
    offset = masking.expand_grid(torch.rand(cells, generator=gen) - 0.5, height, width, patch)
    plain, shifted = masking.standardise_cells(x, patch), masking.standardise_cells(gain * x + offset, patch)
    # a cell of one pixel standardises to 0 whatever its value; elsewhere eps only (MAE's 1e-6) tells them apart
    torch.testing.assert_close(shifted, plain, rtol=1e-2, atol=2e-2)
