"""The export on torch.distributed: the shard rules, and two real gloo ranks (spawned by the test, and under
torchrun) against one process: episodic exactly, online ``grads`` as one process on the global batch, online
``none`` as one stream per rank, and a rank that fails failing the run with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import attrs
import dist_job
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from toy import TinyClassifier, seeded

from yolozu.adapters.detector import DetectorAdapter
from yolozu.bridge import local_batch_stats, make_apply
from yolozu.cli.export import build_parser, main, ttt_config
from yolozu.data import build_manifest
from yolozu.demo.synth import SynthSpec, write_split
from yolozu.functional.state import extract
from yolozu.parallel.collectives import SharedModel
from yolozu.parallel.plan import contiguous_batches, global_batch_parts
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import Adaptation
from yolozu.tta.part import Part
from yolozu.tta.presets import apply_ttt_preset_args
from yolozu.tta.schedules import adapt_and_predict

ROOT = Path(__file__).resolve().parents[1]
TENT = ["--adapter", "detector", "--split", "val", "--quiet", "--wrap", "--ttt", "--ttt-method", "tent"]
ONLINE = [*TENT, "--ttt-schedule", "online", "--ttt-max-batches", "none"]
EPISODIC = [*TENT, "--ttt-reset", "sample", "--ttt-max-batches", "none"]


def _runs(root: Path, bad: Path, out: Path) -> dict[str, list[str]]:
    """The exports the two spawned ranks run. Batches of 1 per rank: the global batches of 5 images are 2, 2 and
    1 (rank 1's part of the last is empty); the bad image (index 3) falls on rank 1's shard in both bad runs."""
    grads = [*ONLINE, "--ttt-batch-size", "1", "--ttt-dist-sync", "grads"]
    return {
        "grads": [*grads, "--dataset", str(root), "--ttt-log-out", str(out / "g.log")],
        "grads_mim": [*grads, "--dataset", str(root), "--max-images", "3", "--ttt-method", "mim"],  # pads too
        "none": [*ONLINE, "--ttt-batch-size", "1", "--dataset", str(root), "--max-images", "3"],
        "bad_episodic": [*EPISODIC, "--dataset", str(bad), "--max-images", "4"],
        "bad_grads": [*grads, "--dataset", str(bad), "--max-images", "4"],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """Five images, and a copy whose image 3 is not an image."""
    root = tmp_path_factory.mktemp("dist") / "ds"
    write_split(root, "val", 5, seed=3, spec=SynthSpec(image_size=160))
    bad = root.parent / "bad"
    shutil.copytree(root, bad)
    sorted((bad / "images" / "val").iterdir())[3].write_bytes(b"not an image")
    return root, bad


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, dataset) -> tuple[Path, list[dict]]:
    """Two gloo ranks running ``dist_job.job``: their output folder and each rank's results."""
    out = tmp_path_factory.mktemp("ranks")
    root, bad = dataset
    args = (2, _free_port(), str(out), _runs(root, bad, out))
    mp.start_processes(dist_job.job, args=args, nprocs=2, start_method="spawn")
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _export(argv: list[str], output: Path) -> dict:
    assert main([*argv, "--output", str(output)]) == 0
    return json.loads(output.read_text())


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert [p["image"] for p in a] == [p["image"] for p in b]
    for p, q in zip(a, b):
        assert len(p["detections"]) == len(q["detections"]) and len(p["detections"]) > 0
        for d, e in zip(p["detections"], q["detections"]):
            assert d["class_id"] == e["class_id"]
            assert d["score"] == pytest.approx(e["score"], abs=1e-5)
            box = [e["bbox"][k] for k in ("cx", "cy", "w", "h")]
            assert [d["bbox"][k] for k in ("cx", "cy", "w", "h")] == pytest.approx(box, abs=1e-5)


def test_shared_model_steps_equal_one_process_on_the_global_batch(spawned):
    steps = spawned[1][0]["shared_steps"]
    assert len(steps["max_diff_to_reference"]) == len(dist_job.SPLITS)  # uneven and empty parts included
    assert max(steps["max_diff_to_reference"]) < 1e-5  # weights and BatchNorm running statistics
    assert all(steps["ranks_bitwise_equal"])
    assert max(steps["loss_diff"]) < 1e-5


def test_func_grad_passes_through_the_all_reduce(spawned):
    assert all(rank["func_grad"] for rank in spawned[1])


def test_online_grads_equals_one_process_on_the_global_batch(spawned, dataset, tmp_path):
    out, ranks = spawned
    assert [rank["exports"]["grads"] for rank in ranks] == [[0, []], [0, []]]
    root, _ = dataset
    one = _export([*ONLINE, "--ttt-batch-size", "2", "--dataset", str(root)], tmp_path / "one.json")
    two = json.loads((out / "grads.json").read_text())
    _assert_same(two["predictions"], one["predictions"])
    report, ref = two["meta"]["ttt"]["report"], one["meta"]["ttt"]["report"]
    assert report["losses"] == pytest.approx(ref["losses"], abs=1e-5) and report["steps_run"] == 3
    assert [r["grad_norm"] for r in report["step_metrics"]] == pytest.approx(
        [r["grad_norm"] for r in ref["step_metrics"]], rel=1e-4)
    spread = two["meta"]["distributed"]
    assert spread == two["meta"]["ttt"]["distributed"]
    assert spread["world_size"] == 2 and spread["semantics"] == "shared-model"
    assert spread["shard_rule"] == "global-batch-parts" and spread["global_batch_size"] == 2
    assert spread["images_per_rank"] == [3, 2]  # rank 1's part of the last global batch is empty
    log = json.loads((out / "g.log").read_text())
    assert log["ttt"]["distributed"] == spread and log["ttt"]["report"]["steps_run"] == 3


def test_online_grads_runs_every_method_it_accepts(spawned):
    out, ranks = spawned
    assert [rank["exports"]["grads_mim"] for rank in ranks] == [[0, []], [0, []]]
    two = json.loads((out / "grads_mim.json").read_text())
    assert two["meta"]["ttt"]["method"] == "mim" and two["meta"]["ttt"]["report"]["steps_run"] == 2
    assert len(two["predictions"]) == 3 and two["meta"]["distributed"]["images_per_rank"] == [2, 1]


def test_online_none_is_one_stream_per_rank(spawned, dataset, tmp_path):
    out, ranks = spawned
    assert [rank["exports"]["none"] for rank in ranks] == [[0, []], [0, []]]
    root, _ = dataset
    two = json.loads((out / "none.json").read_text())
    assert two["meta"]["distributed"]["semantics"] == "independent-streams"
    assert two["meta"]["distributed"]["images_per_rank"] == [2, 1]  # batches of 1: two, then one
    online = [*ONLINE, "--ttt-batch-size", "1", "--dataset", str(root)]
    first = _export([*online, "--max-images", "2"], tmp_path / "first.json")
    args = build_parser().parse_args([*online, "--output", "unused"])
    apply_ttt_preset_args(args)
    records = build_manifest(root, "val")
    second, _ = adapt_and_predict(DetectorAdapter(), records[2:3], ttt_config(args), part=Part(offset=2))
    _assert_same(two["predictions"], first["predictions"] + second)


def test_a_failing_rank_fails_every_rank_and_writes_nothing(spawned):
    out, ranks = spawned
    for run in ("bad_episodic", "bad_grads"):  # the bad image is on rank 1's shard in both
        (code0, err0), (code1, err1) = (rank["exports"][run] for rank in ranks)
        assert code0 == code1 == 1
        assert len(err0) == 1 and err0[0].startswith("error: rank 1 of 2 failed: cannot read image")
        assert "000003.png" in err0[0] and err1 == []
        assert not (out / f"{run}.json").exists()
    written = ["g.log", "grads.json", "grads_mim.json", "none.json", "rank0.json", "rank1.json"]
    assert sorted(p.name for p in out.iterdir()) == written


def test_torchrun_episodic_export_equals_one_process(dataset, tmp_path):
    root, _ = dataset
    argv = [*EPISODIC, "--dataset", str(root), "--max-images", "3", "--ttt-log-out", str(tmp_path / "log.json")]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(ROOT / "tools" / "export_predictions.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*command, *argv, "--output", str(tmp_path / "two.json")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    two = json.loads((tmp_path / "two.json").read_text())
    one = _export([*EPISODIC, "--dataset", str(root), "--max-images", "3"], tmp_path / "one.json")
    _assert_same(two["predictions"], one["predictions"])
    assert two["meta"]["distributed"]["world_size"] == 2 and two["meta"]["ttt"]["distributed"]["world_size"] == 2
    assert two["meta"]["distributed"]["semantics"] == "episodic"
    assert two["meta"]["ttt"]["report"]["losses"] == pytest.approx(one["meta"]["ttt"]["report"]["losses"], abs=1e-5)
    assert "distributed" not in one["meta"] and "distributed" not in one["meta"]["ttt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.json", "one.json", "two.json"]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bn_mode", ["running", "batch"])
def test_the_batch_stats_hook_normalises_as_batchnorm_does(momentum, bn_mode):
    model = seeded(TinyClassifier)
    for module in (model.bn1, model.bn2):
        module.momentum = momentum
    params, buffers = extract(model)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 3 + 1

    def run(apply):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        out, new = apply(leaves, buffers, x, bn_mode=bn_mode)
        grads = torch.autograd.grad(out.logsumexp(1).sum(), list(leaves.values()), allow_unused=True)
        return out.detach(), new, [torch.zeros(()) if g is None else g for g in grads]

    (out, new, grads), (hooked, hooked_new, hooked_grads) = run(make_apply(model)), run(
        make_apply(model, batch_stats=local_batch_stats))
    assert torch.allclose(out, hooked, atol=1e-5)
    assert all(torch.allclose(g, h, atol=1e-5) for g, h in zip(grads, hooked_grads))
    assert new.keys() == hooked_new.keys() and all(torch.allclose(new[k].double(), hooked_new[k].double(), atol=1e-6)
                                                   for k in new)
    assert bn_mode == "batch" or not torch.equal(new["bn1.running_var"], buffers["bn1.running_var"])
    assert "forward" not in vars(model.bn1)  # the module is as it was


def test_padding_is_a_value_of_the_hooks_not_state_flipped_between_batches():
    hooks = SharedModel()
    padded = hooks.padded()
    assert (hooks.padding, padded.padding, padded.group) == (False, True, hooks.group)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        hooks.padding = True
    config = TTTConfig(enabled=True, method="tent", lr=1e-2)
    alone = Adaptation(seeded(TinyClassifier), config)
    with pytest.raises(ValueError, match="padding batch belongs to a model shared by the ranks"):
        alone.adapt(torch.zeros(1, 3, 8, 8), 0, 1, padding=True)


@given(st.integers(0, 40), st.integers(1, 6), st.integers(1, 5))
def test_contiguous_batches_split_whole_batches_in_order(n, unit, world):
    shards = contiguous_batches(n, unit, world)
    assert [i for shard in shards for i in shard] == list(range(n))
    assert all(shard.start % unit == 0 for shard in shards if shard)  # whole batches: the single process's
    sizes = [-(-len(shard) // unit) for shard in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@given(st.integers(1, 40), st.integers(1, 6), st.integers(1, 5))
def test_global_batch_parts_split_each_global_batch_among_the_ranks(n, batch, world):
    parts = global_batch_parts(n, batch, world)
    steps = -(-n // (batch * world))
    assert all(len(rank) == steps for rank in parts)  # every rank steps through every global batch
    for i in range(steps):
        pieces = [parts[r][i] for r in range(world)]
        assert [j for piece in pieces for j in piece] == list(range(i * batch * world, min(n, (i + 1) * batch * world)))
        full = (i + 1) * batch * world <= n
        assert all(len(p) == batch for p in pieces) if full else max(map(len, pieces)) - min(map(len, pieces)) <= 1


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--ttt-dist-sync", "grads"], "needs --ttt-schedule online"),
        (["--ttt-dist-sync", "grads", "--ttt-schedule", "online", "--ttt-reset", "sample"], "--ttt-reset stream"),
        (["--ttt-dist-sync", "grads", "--ttt-reset", "sample", "--ttt-streams", "2"], "drop --ttt-streams"),
        (["--ttt-dist-sync", "grads", "--ttt-schedule", "online", "--ttt-method", "eata"], "use --ttt-dist-sync none"),
    ],
)
def test_dist_sync_that_cannot_share_one_model_is_a_usage_error(dataset, tmp_path, capsys, extra, message):
    root, _ = dataset
    code = main(["--adapter", "detector", "--dataset", str(root), "--output", str(tmp_path / "p.json"), "--ttt",
                 *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and not (tmp_path / "p.json").exists()


def test_dist_sync_needs_ttt(dataset, tmp_path, capsys):
    root, _ = dataset
    code = main(["--dataset", str(root), "--output", str(tmp_path / "p.json"), "--ttt-dist-sync", "none"])
    assert code == 2 and capsys.readouterr().err.strip().endswith("--ttt-dist-sync needs --ttt (it says how the "
                                                                   "ranks' test-time training is shared)")
