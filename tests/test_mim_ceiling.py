"""MIM's error ceiling: images the source model cannot reconstruct as it reconstructs in-distribution ones are left
out of the loss; a step that keeps none changes nothing."""

import pytest
import torch
from toy import TinyAutoencoder, seeded

from yolozu.bridge import make_apply
from yolozu.functional import filters, optim, rng
from yolozu.functional.losses import masked_reconstruction_errors, masked_reconstruction_loss
from yolozu.functional.masking import apply_mask, block_mask
from yolozu.functional.methods.mim import CALIBRATION_SEED, MIMSettings, MIMState, mim_method
from yolozu.functional.readout import Readout
from yolozu.functional.step import make_update
from yolozu.tta.config import TTTConfig

SETTINGS = MIMSettings(patch_size=4, mask_prob=0.5, error_quantile=0.5, reference_data="train")


def _images(seed, n=4):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _with_ceiling(state, ceiling):
    return state._replace(method_state=MIMState(torch.tensor(float(ceiling))))


def _recon(model, x, mask):
    with torch.no_grad():
        model.train()
        return model(apply_mask(x, mask))


def test_per_image_errors_are_each_images_own_masked_loss():
    pred, target = _images(0, 3), _images(1, 3)
    mask = block_mask(rng.key(2), 3, 16, 16, patch_size=4, mask_prob=0.5)
    mask[2] = False  # an image with no masked pixel has no error
    errors = masked_reconstruction_errors(pred, target, mask)
    assert errors.shape == (3,) and errors[2] == 0
    for i in range(2):
        torch.testing.assert_close(errors[i], masked_reconstruction_loss(pred[i : i + 1], target[i : i + 1],
                                                                         mask[i : i + 1]))  # fmt: skip


def test_the_loss_reads_only_the_images_within_the_ceiling():
    model = seeded(TinyAutoencoder)
    tx = optim.sgd(0.1)
    method = mim_method(make_apply(model), tx, SETTINGS)
    x = _images(3)
    mask = block_mask(rng.key(4), 4, 16, 16, patch_size=4, mask_prob=0.5)
    recon = _recon(model, x, mask)
    errors = masked_reconstruction_errors(recon, x, mask)
    ceiling = errors.sort().values[1:3].mean()  # between the second and third smallest: two images kept
    kept = errors <= ceiling
    state = _with_ceiling(method.init_state(model, filters.select(model, "all")), ceiling)
    _, metrics = make_update(method)(state, x, mask)
    assert int(metrics["kept"]) == 2
    expected = masked_reconstruction_loss(recon, x, mask & kept.view(-1, 1, 1, 1))
    torch.testing.assert_close(metrics["loss"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, masked_reconstruction_loss(recon, x, mask))


def test_a_step_that_keeps_no_image_changes_nothing_even_with_momentum():
    model = seeded(TinyAutoencoder)
    tx = optim.adam(1e-2)
    method = mim_method(make_apply(model), tx, SETTINGS)
    update = make_update(method)
    x = _images(5)
    mask = block_mask(rng.key(6), 4, 16, 16, patch_size=4, mask_prob=0.5)
    moved, _ = update(method.init_state(model, filters.select(model, "all")), x, mask)  # Adam now has momentum
    after, metrics = update(_with_ceiling(moved, 0.0), x, mask)
    assert int(metrics["kept"]) == 0 and float(metrics["update_norm"]) == 0.0
    for tree in ("trainable", "opt_state", "buffers"):
        new, old = (torch.utils._pytree.tree_leaves(getattr(s, tree)) for s in (after, moved))
        assert all(torch.equal(a, b) for a, b in zip(new, old)), tree
    kept_all, _ = update(moved, x, mask)  # the ceiling it was calibrated to (+inf) keeps every image
    assert not torch.equal(kept_all.trainable["dec.weight"], moved.trainable["dec.weight"])


def test_calibration_measures_the_quantile_of_the_source_errors_on_masked_clean_batches():
    model = seeded(TinyAutoencoder)
    batches = [_images(7), _images(8)]
    root = rng.key(CALIBRATION_SEED)
    masks = [block_mask(rng.fold_in(root, i), 4, 16, 16, patch_size=4, mask_prob=0.5) for i in range(2)]
    errors = torch.cat([masked_reconstruction_errors(_recon(model, x, m), x, m) for x, m in zip(batches, masks)])

    def ceiling(quantile):
        settings = MIMSettings(patch_size=4, mask_prob=0.5, error_quantile=quantile, reference_data="train")
        method = mim_method(make_apply(model), optim.sgd(0.1), settings)
        return method.calibrate(method.init_state(model, filters.select(model, "all")), iter(batches)).method_state

    torch.testing.assert_close(ceiling(1.0).ceiling, errors.max())
    torch.testing.assert_close(ceiling(0.0).ceiling, errors.min())
    assert errors.min() < ceiling(0.5).ceiling < errors.max()
    uncalibrated = mim_method(make_apply(model), optim.sgd(0.1), MIMSettings(patch_size=4))
    state = uncalibrated.init_state(model, filters.select(model, "all"))
    assert uncalibrated.calibrate(state, iter(batches)).method_state.ceiling == float("inf")


def test_the_ceiling_needs_its_reference_data_and_a_pixel_reconstruction():
    apply = make_apply(seeded(TinyAutoencoder))
    with pytest.raises(ValueError, match="mim_reference_data"):
        mim_method(apply, optim.sgd(0.1), MIMSettings(error_quantile=0.9))
    with pytest.raises(ValueError, match="read only to measure the error ceiling"):
        mim_method(apply, optim.sgd(0.1), MIMSettings(reference_data="train"))
    with pytest.raises(ValueError, match="reconstructs its features"):
        mim_method(apply, optim.sgd(0.1), SETTINGS, readout=Readout(structured_mim=True))
    with pytest.raises(ValueError, match="error_quantile"):
        MIMSettings(error_quantile=1.5)


def test_the_reference_data_is_the_split_mim_calibrates_on():
    config = TTTConfig(method="mim", mim_error_quantile=0.99, mim_reference_data="train")
    assert config.calibration_split() == "train"
    assert TTTConfig(method="mim").calibration_split() is None
