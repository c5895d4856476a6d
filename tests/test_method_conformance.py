"""What every registered method does, checked for each name in the registry (built-in or plug-in), so a new
method is tested by registering it: a guarded step on a small model changes only the selected tensors, K
vmapped streams equal K single drives with a tripped stream rolled back bitwise, every tensor a step makes is
on its state's device, and the export runs it in every schedule on the built-in detector.

A method's ``MethodEntry.probe`` settings make one step on a small model move the weights; its ``signals`` pick
the model (``reconstruction``: an autoencoder; ``heatmap``: sigmoid class maps; ``features``: sigmoid class maps
whose readout names a layer and carries its source statistics)."""

import json

import pytest
import torch
from toy import TinyAutoencoder, TinyClassifier, TinyHeatmap, seeded

from yolozu.bridge import make_apply
from yolozu.cli.export import main
from yolozu.demo.synth import SynthSpec, write_split
from yolozu.functional import rng, streams
from yolozu.functional.driver import make_driver, start
from yolozu.functional.feature_stats import compute_stats
from yolozu.functional.readout import DEFAULT_READOUT, Readout
from yolozu.functional.state import extract
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import build_method
from yolozu.tta.methods import METHODS

ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=ON_CUDA)]
NAMES = sorted(METHODS)


def probe_config(name: str, **changes) -> TTTConfig:
    """``name`` with its probe settings, lr 1e-2 on the norm layers."""
    entry = METHODS[name]
    probe = {entry.prefix + key: value for key, value in entry.probe.items()}
    return TTTConfig(enabled=True, method=name, lr=1e-2, update_filter="norm_only", **{**probe, **changes})


def with_source_stats(model: torch.nn.Module) -> Readout:
    """A sigmoid heatmap readout naming the class head with its statistics over 8 seeded random images."""
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(7)).to(next(model.parameters()).device)
    params, buffers = extract(model)
    stats, _ = compute_stats(make_apply(model), params, buffers, [images], ["head"], bn_mode="batch")
    return Readout(score_kind="sigmoid", spatial=True, layers=("head",), source_stats=stats)


SIGNAL_MODELS = {
    "reconstruction": (TinyAutoencoder, lambda model: DEFAULT_READOUT),
    "heatmap": (TinyHeatmap, lambda model: Readout(score_kind="sigmoid", spatial=True)),
    "features": (TinyHeatmap, with_source_stats),
}
"""A small model and (from it) its readout for each signal a method may need; class scores otherwise."""


def probe_model(name: str, device: str = "cpu") -> tuple[torch.nn.Module, Readout]:
    signal = next((s for s in METHODS[name].signals if s in SIGNAL_MODELS), None)
    factory, readout = SIGNAL_MODELS.get(signal, (TinyClassifier, lambda model: DEFAULT_READOUT))
    model = seeded(factory).to(device)
    return model, readout(model)


def _leaves(tree) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _drive(name: str, device: str, xs: torch.Tensor, steps: int = 2):
    model, readout = probe_model(name, device)
    config = probe_config(name)
    method, names = build_method(model, config, readout)
    source = method.init_state(model, names)
    drive = make_driver(method, config.guard_limits())
    carry, records = drive(start(source, xs.shape[0]), xs.to(device), list(range(xs.shape[0])), steps, rng.key(0))
    return source, carry, records, drive


def _images(seed: int = 0) -> torch.Tensor:
    """Three streams of batches of four 16 px images; stream 1 is NaN, so the non-finite guard trips it."""
    xs = torch.rand(3, 4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    xs[1] = float("nan")
    return xs


@pytest.mark.parametrize("name", NAMES)
def test_a_step_changes_selected_tensors_only(name):
    source, carry, _, _ = _drive(name, "cpu", _images()[:1])
    (state,) = streams.unstack_states(carry.state, 1)
    moved = [n for n in state.trainable if not torch.equal(state.trainable[n], source.trainable[n])]
    assert moved, f"{name}: no selected tensor moved"
    assert all(torch.equal(state.frozen[n], source.frozen[n]) for n in source.frozen)
    assert all(n.rsplit(".", 1)[0].startswith("bn") for n in state.trainable)  # norm_only: BatchNorm affine only


@pytest.mark.parametrize("name", NAMES)
def test_k_streams_equal_single_drives_and_a_tripped_stream_is_rolled_back_bitwise(name):
    xs = _images()
    source, carry, records, drive = _drive(name, "cpu", xs)
    assert records[0].kept.tolist() == [True, False, True]
    per_stream = streams.unstack_states(carry.state, 3)
    assert all(torch.equal(per_stream[1].trainable[n], source.trainable[n]) for n in source.trainable)
    for k in (0, 2):
        alone, _ = drive(start(source), xs[k : k + 1], [k], 2, rng.key(0))
        (single,) = streams.unstack_states(alone.state, 1)
        for n in single.trainable:
            torch.testing.assert_close(per_stream[k].trainable[n], single.trainable[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_every_tensor_a_step_makes_is_on_the_states_device(device, name):
    _, carry, records, _ = _drive(name, device, _images())
    made = _leaves(carry) + [t for r in records for t in _leaves((r.metrics, r.verdict, r.kept, r.taken))]
    assert made and all(t.device.type == device for t in made), "a step made a tensor off its state's device"
    if device == "cuda":
        _, on_cpu, _, _ = _drive(name, "cpu", _images())
        for got, want in zip(_leaves(carry.state.trainable), _leaves(on_cpu.state.trainable)):
            torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    write_split(root, "val", 4, seed=5, spec=SynthSpec(image_size=96))
    return root


SCHEDULES = {
    "pre": ["--ttt-schedule", "pre", "--ttt-batch-size", "2", "--ttt-max-batches", "2", "--ttt-steps", "2"],
    "online": ["--ttt-schedule", "online", "--ttt-batch-size", "2", "--ttt-max-batches", "none"],
    "sample": ["--ttt-reset", "sample", "--ttt-streams", "2", "--ttt-max-batches", "none"],
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name", NAMES)
def test_the_export_runs_it_in_every_schedule_on_the_detector(tmp_path, dataset, name, schedule):
    entry = METHODS[name]
    flags = [f"--ttt-{(entry.flag_prefix if entry.flag_prefix is not None else entry.prefix) + key}".replace("_", "-")
             for key in entry.probe]
    probe = [a for flag, value in zip(flags, entry.probe.values()) for a in (flag, str(value))]
    probe = [a for a in probe if a != "True"]  # a true switch is its flag alone
    out = tmp_path / "p.json"
    args = ["--adapter", "detector", "--dataset", str(dataset), "--output", str(out), "--quiet", "--wrap",
            "--workers", "0", "--seed", "3", "--ttt", "--ttt-method", name, "--ttt-lr", "1e-3", *probe]
    assert main(args + SCHEDULES[schedule]) == 0
    report = json.loads(out.read_text())["meta"]["ttt"]["report"]
    assert report["steps_run"] > 0 and report["updated_param_count"] > 0
