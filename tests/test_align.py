"""Feature alignment: the bridge's taps, the source statistics (moments, file, command) and the align loss."""

import json

import pytest
import torch
from toy import TinyHeatmap, seeded

from yolozu.bridge import make_apply
from yolozu.cli import source_stats
from yolozu.demo.synth import SynthSpec, write_split
from yolozu.functional import optim
from yolozu.functional.feature_stats import accumulate, as_layer_stats, compute_stats, finish, per_channel
from yolozu.functional.methods.align import AlignSettings, align_method, moment_gap, running_moments, sampling_noise
from yolozu.functional.readout import Readout
from yolozu.functional.state import extract
from yolozu.functional.step import make_update
from yolozu.io.feature_stats import load_tensors, save_stats, sidecar_path, stats_path_for


def load_stats(path):
    return as_layer_stats(load_tensors(path))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_taps_are_the_layers_outputs_of_the_same_forward():
    model = seeded(TinyHeatmap)
    params, buffers = extract(model)
    apply = make_apply(model)
    x = _images(4)
    plain, _ = apply(params, buffers, x, bn_mode="batch")
    (output, features), _ = apply(params, buffers, x, bn_mode="batch", taps=("bn1", "head"))
    assert torch.equal(output, plain) and torch.equal(features["head"], plain)
    h = model.conv1(x)
    want = (h - h.mean((0, 2, 3), keepdim=True)) / torch.sqrt(h.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    affine = want * model.bn1.weight.view(1, -1, 1, 1) + model.bn1.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(features["bn1"], affine)
    assert not model.conv1._forward_hooks and not model.bn1._forward_hooks  # removed after the call
    with pytest.raises(KeyError, match="'nope' is not a submodule"):
        apply(params, buffers, x, taps=("nope",))


def test_statistics_over_batches_equal_the_moments_of_all_images():
    x = torch.randn(10, 4, 3, 5, generator=torch.Generator().manual_seed(1))
    sums = accumulate(accumulate({}, {"a": x[:3]}), {"a": x[3:]})
    stats = finish(sums)["a"]
    torch.testing.assert_close(stats.mean, x.mean(0))
    torch.testing.assert_close(stats.var, x.var(0, unbiased=False))
    torch.testing.assert_close(stats.pooled_var, x.mean((2, 3)).var(0, unbiased=False))
    mean, var = per_channel(stats.mean, stats.var)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)


def test_statistics_file_round_trips_with_its_sidecar(tmp_path):
    stats = finish(accumulate({}, {"a": torch.randn(4, 2, 3, 3)}))
    path = stats_path_for(tmp_path / "model.pt")
    assert path.name == "model.align.pt" and sidecar_path(path).name == "model.align.json"
    save_stats(path, stats, {"bn_mode": "batch", "count": 4})
    for got, want in zip(load_stats(path)["a"], stats["a"]):
        assert torch.equal(got, want)
    side = json.loads(sidecar_path(path).read_text())
    assert side["layers"] == ["a"] and side["bn_mode"] == "batch" and side["shapes"] == {"a": [2, 3, 3]}
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="is not a source statistics file"):
        load_stats(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not source statistics"):
        as_layer_stats({"a": {"mean": stats["a"].mean}})


def test_running_moments_weigh_a_batch_by_its_share_and_the_first_sets_them():
    old = (torch.full((2,), float("nan")),)
    new = (torch.tensor([1.0, 3.0]),)
    (first,) = running_moments(old, new, 0.25)
    assert torch.equal(first, new[0])
    (second,) = running_moments((first,), (torch.tensor([5.0, 7.0]),), 0.25)
    torch.testing.assert_close(second, torch.tensor([2.0, 4.0]))


def test_a_gap_within_the_noise_floor_counts_as_none_and_beyond_it_less_the_floor():
    # source per channel: mean 0, var 4, pooled var 2 -> over 8 images se of the mean 0.5, of the variance 2
    source = (torch.zeros(2), torch.full((2,), 4.0), torch.zeros(2), torch.full((2,), 2.0))
    mean_se, var_se = sampling_noise(source, 8.0, per_location=False)
    torch.testing.assert_close(mean_se, torch.full((2,), 0.5))
    torch.testing.assert_close(var_se, torch.full((2,), 2.0))
    per_location_se, _ = sampling_noise(source, 8.0, per_location=True)
    torch.testing.assert_close(per_location_se, torch.full((2,), (4.0 / 8.0) ** 0.5))
    mean = torch.tensor([0.5, 2.0], requires_grad=True)  # mean gaps 0.5 (one se: none left) and 2.0
    var = torch.tensor([5.0, 9.0])  # variance gaps 1 and 5
    moments = (mean, var + mean.detach() ** 2, torch.zeros(2), torch.zeros(2))
    floor = AlignSettings(noise_floor=1.0, var_weight=1.0)
    loss = moment_gap(moments, source, floor, images=8.0)
    # mean: mean(max(0, [0.5, 2] - 0.5)) = 0.75; variance: mean(max(0, [1, 5] - 2)) = 1.5
    torch.testing.assert_close(loss, torch.tensor(0.75 + 1.5))
    (grad,) = torch.autograd.grad(loss, mean)
    assert grad[0] == 0 and grad[1] != 0  # the gap within the floor pulls nothing
    plain = moment_gap(moments, source, AlignSettings(var_weight=1.0), images=8.0)
    torch.testing.assert_close(plain, torch.tensor(1.25 + 3.0))


def test_with_a_noise_floor_a_batch_like_the_source_makes_no_step():
    model = seeded(TinyHeatmap)
    images = _images(8)
    state_of = lambda method: method.init_state(model, ["bn1.weight", "bn1.bias"])  # noqa: E731
    method = _method(model, images[:4], noise_floor=3.0)
    near = images[4:]  # other images of the same kind: their moments differ by sampling noise only
    new, metrics = make_update(method)(state_of(method), near, None)
    assert metrics["loss"] == 0 and metrics["mean_gap"] > 0
    assert torch.equal(new.trainable["bn1.bias"], state_of(method).trainable["bn1.bias"])
    plain = _method(model, images[:4])
    moved, _ = make_update(plain)(state_of(plain), near, None)
    assert not torch.equal(moved.trainable["bn1.bias"], state_of(plain).trainable["bn1.bias"])
    far, shifted = make_update(method)(state_of(method), near * 0.3 + 0.5, None)
    assert shifted["loss"] > 0 and not torch.equal(far.trainable["bn1.bias"], state_of(method).trainable["bn1.bias"])


def _method(model, images, **settings):
    params, buffers = extract(model)
    apply = make_apply(model)
    stats, _ = compute_stats(apply, params, buffers, [images], ["head"], bn_mode="batch")
    readout = Readout(score_kind="sigmoid", spatial=True, layers=("head",), source_stats=stats)
    return align_method(apply, optim.build("adam", 1e-2), AlignSettings(**settings), readout=readout, bn="batch")


@pytest.mark.parametrize("per_location", [False, True])
def test_the_loss_vanishes_on_the_source_batch_and_moves_the_weights_on_a_shifted_one(per_location):
    model = seeded(TinyHeatmap)
    images = _images(8)
    method = _method(model, images, per_location=per_location)
    state = method.init_state(model, ["bn1.weight", "bn1.bias"])
    update = make_update(method, keep_output=True)
    _, same = update(state, images, None)
    assert same["loss"] < 1e-5
    plain, _ = make_apply(model)(state.trainable | state.frozen, state.buffers, images, bn_mode="batch")
    assert torch.equal(same["output"], plain)  # the update's forward is the prediction
    new, shifted = update(state, images * 0.3 + 0.5, None)
    assert shifted["loss"] > 1e-3 and shifted["mean_gap"] > 0
    assert not torch.equal(new.trainable["bn1.bias"], state.trainable["bn1.bias"])
    assert all(torch.isfinite(t).all() for t in new.method_state.running["head"])


def test_align_without_source_statistics_says_how_to_make_them():
    model = seeded(TinyHeatmap)
    with pytest.raises(ValueError, match="tools/source_stats.py"):
        align_method(make_apply(model), optim.build("adam", 1e-3), readout=Readout(layers=("head",)))
    with pytest.raises(ValueError, match="names none"):
        align_method(make_apply(model), optim.build("adam", 1e-3))
    flat = finish(accumulate({}, {"head": torch.randn(2, 3)}))  # per-channel moments only
    with pytest.raises(ValueError, match="per channel; drop --ttt-align-per-location"):
        align_method(make_apply(model), optim.build("adam", 1e-3), AlignSettings(per_location=True),
                     readout=Readout(layers=("head",), source_stats=flat))


def test_the_command_writes_statistics_beside_a_checkpoint_and_refuses_bad_input(tmp_path, capsys):
    write_split(tmp_path / "data", "train", 3, seed=2, spec=SynthSpec(image_size=160))
    out = tmp_path / "s.align.pt"
    args = ["--dataset", str(tmp_path / "data"), "--batch-size", "2", "--output", str(out), "--layers", "stage4"]
    assert source_stats.main(args + ["--images", "0"]) == 2 and not out.exists()
    assert "--images must be at least 1" in capsys.readouterr().err
    assert source_stats.main(args) == 0
    side = json.loads(sidecar_path(out).read_text())
    assert side["count"] == 3 and side["bn_mode"] == "batch" and side["layers"] == ["stage4"]
    assert side["command"].startswith("python tools/source_stats.py")
    assert load_stats(out)["stage4"].mean.shape == (192, 5, 5)
    assert source_stats.main(args + ["--per-channel"]) == 0 and load_stats(out)["stage4"].mean.shape == (192,)
    nested = tmp_path / "runs" / "align" / "s.align.pt"  # a folder not made yet: made with both files
    assert source_stats.main(args + ["--output", str(nested)]) == 0
    assert load_stats(nested)["stage4"].mean.shape == (192, 5, 5) and sidecar_path(nested).is_file()
