"""Every method, K streams with guards, and the export's schedules on each device.

Each test runs on CPU in every suite (so the test itself cannot rot) and on CUDA where a GPU is present
(``cuda`` marker; ``make test-gpu`` runs only those). On CUDA it also checks that no tensor a step makes is left
on the CPU (under ``vmap`` a CPU tensor meeting a CUDA one is an error), that the result matches the CPU one, and
that two seeded exports are bitwise identical.
"""

import json

import pytest
import torch
from toy import TinyAutoencoder, TinyClassifier, seeded

from yolozu.cli.export import main
from yolozu.demo.synth import SynthSpec, write_split
from yolozu.functional import rng
from yolozu.functional.driver import make_driver, start
from yolozu.functional.methods import METHODS
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import build_method

ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=ON_CUDA)]
CONFIGS = {
    "tent": {},
    "mim": {"mim_patch_size": 4, "mim_mask_prob": 0.5},
    "cotta": {"cotta_restore_prob": 0.5},  # the stochastic restore runs at every step
    "eata": {"eata_conf_min": 0.0, "eata_entropy_min": 0.0, "eata_e_margin": 10.0},
    "sar": {"sar_e_margin": 10.0, "sar_adaptive": True},
}


def _leaves(tree) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _drive(name: str, device: str):
    model = seeded(TinyAutoencoder if name == "mim" else TinyClassifier).to(device)
    config = TTTConfig(enabled=True, method=name, lr=1e-2, update_filter="norm_only", **CONFIGS[name])
    method, names = build_method(model, config)
    xs = torch.rand(3, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)
    xs[1] = float("nan")  # stream 1 trips the non-finite guard and is rolled back
    drive = make_driver(method, config.guard_limits())
    return drive(start(method.init_state(model, names), 3), xs, [0, 1, 2], 2, rng.key(0))


def test_every_method_is_registered_here():
    assert set(CONFIGS) == set(METHODS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_method_drives_guarded_streams_on_the_device(device, name):
    carry, records = _drive(name, device)
    assert records[0].kept.tolist() == [True, False, True]
    made = _leaves(carry) + [t for r in records for t in _leaves((r.metrics, r.verdict, r.kept, r.taken))]
    assert made and all(t.device.type == device for t in made), "a step made a tensor off its state's device"
    if device == "cuda":
        on_cpu, _ = _drive(name, "cpu")
        for got, want in zip(_leaves(carry.state.trainable), _leaves(on_cpu.state.trainable)):
            torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    write_split(root, "val", 4, seed=5, spec=SynthSpec(image_size=160))
    return root


SCHEDULES = {
    "online": ["--ttt-schedule", "online", "--ttt-batch-size", "2", "--ttt-max-batches", "none"],
    "sample": ["--ttt-reset", "sample", "--ttt-streams", "2", "--ttt-max-batches", "none"],
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize(  # CoTTA on CPU is covered by the stream and schedule tests; here it adds only time
    "device,method,extra",
    [
        ("cpu", "tent", []),
        pytest.param("cuda", "tent", [], marks=ON_CUDA),
        pytest.param("cuda", "cotta", [], marks=ON_CUDA),
        pytest.param("cuda", "tent", ["--ttt-capture"], marks=ON_CUDA),  # replayed CUDA graphs
        pytest.param("cuda", "cotta", ["--ttt-capture"], marks=ON_CUDA),
    ],
)
def test_export_schedules_run_and_repeat_bitwise_on_the_device(tmp_path, dataset, device, schedule, method, extra):
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.json"
        args = ["--adapter", "detector", "--dataset", str(dataset), "--output", str(out), "--quiet", "--wrap"]
        args += ["--device", device, "--seed", "3", "--ttt", "--ttt-method", method, "--ttt-lr", "1e-2", *extra]
        assert main(args + SCHEDULES[schedule]) == 0
        outputs.append(json.loads(out.read_text()))
    first, second = ({**doc["meta"]["ttt"]["report"], "seconds": None} for doc in outputs)  # wall clock aside
    assert outputs[0]["predictions"] == outputs[1]["predictions"] and first == second
    assert first["steps_run"] > 0 and not first["stopped_early"]


def test_deterministic_switch_sets_kernels_cudnn_and_the_cublas_workspace(monkeypatch):
    from yolozu.runtime.determinism import CUBLAS_WORKSPACE, set_deterministic

    was = torch.are_deterministic_algorithms_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        assert set_deterministic(True) == {"deterministic": True, "cublas_workspace_config": CUBLAS_WORKSPACE}
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own choice is kept
        assert set_deterministic(True)["cublas_workspace_config"] == ":16:8"
        assert set_deterministic(False)["deterministic"] is False
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        set_deterministic(was)


def test_export_records_its_determinism(tmp_path, dataset):
    for flag, expected in (([], True), (["--no-deterministic"], False)):
        out = tmp_path / "p.json"
        args = ["--adapter", "detector", "--dataset", str(dataset), "--output", str(out), "--quiet", "--wrap"]
        assert main(args + flag) == 0
        assert json.loads(out.read_text())["meta"]["deterministic"] is expected


def test_capture_changes_nothing_off_cuda_and_is_recorded(tmp_path, dataset):
    docs = []
    for flag in ([], ["--ttt-capture"]):
        out = tmp_path / "p.json"
        args = ["--adapter", "detector", "--dataset", str(dataset), "--output", str(out), "--quiet", "--wrap"]
        args += ["--seed", "3", "--ttt", "--ttt-method", "tent", "--ttt-lr", "1e-2", *SCHEDULES["online"], *flag]
        assert main(args) == 0
        docs.append(json.loads(out.read_text()))
    assert docs[0]["predictions"] == docs[1]["predictions"]
    assert [d["meta"]["ttt"]["capture"] for d in docs] == [False, True]
