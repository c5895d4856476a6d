"""MIM on a model that reconstructs its own features (YOLOZU's structured MIM hook): the forward it is called
with, the loss against a closed form, the rows, and a clear error for a model that does not honour the hook."""

import math

import pytest
import torch
from torch import nn

from yolozu.bridge import make_apply
from yolozu.functional import optim, rng
from yolozu.functional.methods import mim
from yolozu.functional.readout import DEFAULT_READOUT, Readout, readout_of
from yolozu.functional.step import make_step
from yolozu.tta import TTTConfig, run_ttt


class FeatureMIM(nn.Module):
    """Reconstructs its features: ``recon_feat`` a linear map of them, ``teacher_feat`` the features."""

    enable_mim = True

    def __init__(self, entropy: bool = True, mask: bool = False):
        super().__init__()
        self.norm, self.conv, self.recon = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1, bias=False), nn.Conv2d(3, 3, 1)
        self.entropy, self.mask, self.calls = entropy, mask, []

    def forward(self, x, geom_input=None, feature_mask=None, return_mim=False):
        self.calls.append((geom_input, feature_mask, return_mim))
        feat = self.norm(self.conv(x))
        out = {"logits": feat.mean(dim=(2, 3)).unsqueeze(1)}
        if return_mim:
            out["mim"] = {"recon_feat": self.recon(feat), "teacher_feat": feat}
            if self.entropy:
                out["mim"]["entropy"] = out["logits"].abs().mean()
            if self.mask:
                out["mim"]["mask"] = feature_mask
        return out


class Adapter:
    def __init__(self, model):
        self.model = model

    def get_model(self):
        return self.model

    def build_loader(self, records, *, batch_size=1):
        yield torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_the_geometry_input_is_a_support_channel_and_the_log_luminance_over_the_median():
    x = torch.tensor([[[[1.0, 2.0], [4.0, 0.0]]]]).repeat(1, 3, 1, 1)
    geometry = mim.geometry_input(x)
    median = 1.0  # torch's lower median of 0, 1, 2, 4
    expected = torch.log(torch.tensor([[1.0, 2.0], [4.0, 1e-6]])) - math.log(median)
    assert geometry.shape == (1, 2, 2, 2) and torch.equal(geometry[:, 0], torch.ones(1, 2, 2))
    torch.testing.assert_close(geometry[0, 1], expected)


@pytest.mark.parametrize("returns_mask", [False, True])
def test_the_loss_is_the_masked_feature_error_plus_the_weighted_entropy(returns_mask):
    torch.manual_seed(0)
    model = FeatureMIM(mask=returns_mask)
    settings = mim.MIMSettings(patch_size=2, mask_prob=0.5)
    method = mim.mim_method(make_apply(model), optim.sgd(0.0), settings, readout=Readout(structured_mim=True))
    state = method.init_state(model, ["norm.weight", "norm.bias"])
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    _, metrics = make_step(method)(state, x, rng.key(3))
    geometry, mask, flag = model.calls[-1]
    assert flag is True and torch.equal(geometry, mim.geometry_input(x)) and mask.shape == (2, 1, 8, 8)
    with torch.no_grad():
        out = FeatureMIM.forward(model, x, return_mim=True)["mim"]
    weight = mask.float().expand(2, 3, 8, 8) if returns_mask else torch.ones(2, 3, 8, 8)
    error = ((out["recon_feat"] - out["teacher_feat"]).square() * weight).sum() / weight.sum()
    torch.testing.assert_close(metrics["loss_mim"], error)
    torch.testing.assert_close(metrics["loss"], error + mim.STRUCTURED_ENTROPY_WEIGHT * out["entropy"])
    assert float(metrics["mask_ratio"]) == float(mask.float().mean())  # the model's mask, or the one drawn


def test_run_ttt_on_a_structured_model_adapts_and_writes_yolozus_row_keys():
    model = FeatureMIM(entropy=False)
    assert readout_of(Adapter(model)).structured_mim and readout_of(Adapter(nn.Linear(1, 1))) == DEFAULT_READOUT
    before = model.norm.weight.detach().clone()
    config = TTTConfig(enabled=True, method="mim", steps=2, lr=1e-2, update_filter="norm_only", mim_patch_size=2)
    report = run_ttt(Adapter(model), [{"image": "a.jpg"}], config)
    row = report.step_metrics[0]
    assert report.steps_run == 2 and row["mim_loss"] == row["loss_mim"] > 0 and row["entropy_loss"] is None
    assert "loss_entropy" not in row["non_finite_fields"] and not torch.equal(model.norm.weight, before)


def test_a_model_that_enables_mim_but_returns_no_mim_entry_is_named():
    class Broken(FeatureMIM):
        def forward(self, x, **kwargs):
            return {"logits": self.norm(self.conv(x)).mean(dim=(2, 3))}

    method = mim.mim_method(make_apply(Broken()), optim.sgd(0.1), readout=Readout(structured_mim=True))
    state = method.init_state(Broken(), ["norm.weight"])
    with pytest.raises(KeyError, match="structured-MIM model .* recon_feat and teacher_feat.*got \\['logits'\\]"):
        make_step(method)(state, torch.rand(2, 3, 8, 8), rng.key(0))


def test_norm_pix_loss_on_a_feature_reconstructing_model_is_an_error_naming_the_flag():
    settings = mim.MIMSettings(norm_pix_loss=True)
    with pytest.raises(ValueError, match="reconstructs its features: leave --ttt-norm-pix-loss off"):
        mim.mim_method(make_apply(FeatureMIM()), optim.sgd(0.1), settings, readout=Readout(structured_mim=True))
