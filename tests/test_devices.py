"""The export's schedules and its determinism switches on each device (each method's own device checks are in
tests/test_method_conformance.py).

Each test runs on CPU in every suite (so the test itself cannot rot) and on CUDA where a GPU is present
(``cuda`` marker; ``make test-gpu`` runs only those). On CUDA it also checks that no tensor a step makes is left
on the CPU (under ``vmap`` a CPU tensor meeting a CUDA one is an error), that the result matches the CPU one, and
that two seeded exports are bitwise identical.
"""

import json

import pytest
import torch

from tests.toy import UNGUARDED
from yolozu.cli.export import main
from yolozu.demo.synth import SynthSpec, write_split

ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=ON_CUDA)]
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    write_split(root, "val", 4, seed=5, spec=SynthSpec(image_size=160))
    return root


MIM_CEILING = ["--ttt-error-quantile", "0.5", "--ttt-reference-data", "val"]
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
        pytest.param("cuda", "tent", ["--ttt-source-pull", "0.1"], marks=ON_CUDA),  # the pull's copy of the source
        pytest.param("cuda", "align", ["--ttt-source-pull", "0.1", "--ttt-capture"], marks=ON_CUDA),
        ("cpu", "mim", MIM_CEILING),  # the ceiling is calibrated on the run's device from the reference split
        pytest.param("cuda", "mim", MIM_CEILING, marks=ON_CUDA),
    ],
)
def test_export_schedules_run_and_repeat_bitwise_on_the_device(tmp_path, dataset, device, schedule, method, extra):
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.json"
        args = ["--adapter", "detector", "--dataset", str(dataset), "--output", str(out), "--quiet", "--wrap"]
        args += ["--device", device, "--seed", "3", "--ttt", "--ttt-method", method, "--ttt-lr", "1e-2", *extra]
        args += UNGUARDED
        assert main(args + SCHEDULES[schedule]) == 0
        outputs.append(json.loads(out.read_text()))
    # wall clock and process memory aside
    first, second = ({**doc["meta"]["ttt"]["report"], "seconds": None, "memory": None} for doc in outputs)
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
