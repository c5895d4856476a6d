"""Captured steps (``yolozu.functional.capture``): the same results as the eager step, the caller's inputs never
written, earlier results kept, a new recording for a new shape or new passed-through tensors.

On CPU the ``rerun`` backend runs the captured path (static inputs, passed-through inputs read in place, outputs
copied out) with the function run again in place of a graph replay; the ``cuda``-marked tests replay real CUDA
graphs (``make test-gpu``).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy import TinyAutoencoder, TinyClassifier, seeded

from yolozu.functional import rng
from yolozu.functional.capture import captured, maybe_captured
from yolozu.functional.driver import make_driver, start
from yolozu.functional.step import make_update
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import build_method

ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
CONFIGS = {
    "tent": {},
    "mim": {"mim_patch_size": 4, "mim_mask_prob": 0.5},
    "cotta": {"cotta_restore_prob": 0.5},
    "eata": {"eata_conf_min": 0.0, "eata_entropy_min": 0.0, "eata_e_margin": 10.0},
    "sar": {"sar_e_margin": 10.0, "sar_adaptive": True},
}


def _leaves(tree) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _method(name: str = "tent", device: str = "cpu"):
    model = seeded(TinyAutoencoder if name == "mim" else TinyClassifier).to(device)
    config = TTTConfig(enabled=True, method=name, lr=1e-2, update_filter="norm_only", **CONFIGS[name])
    method, names = build_method(model, config)
    return method, method.init_state(model, names), config


def _batch(n: int = 4, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)).to(device)


def _drive(name: str, capture, device: str = "cpu"):
    method, state, config = _method(name, device)
    xs = _batch(3 * 4, device=device).reshape(3, 4, 3, 16, 16)
    xs[1] = float("nan")  # stream 1 trips the non-finite guard and is rolled back
    drive = make_driver(method, config.guard_limits(), capture=capture)
    carry, records = drive(start(state, 3), xs, [0, 1, 2], 2, rng.key(0))
    single, _ = drive(start(state, 1), xs[:1], [0], 3, rng.key(0))
    return _leaves(carry) + _leaves(single) + [t for r in records for t in _leaves((r.metrics, r.kept))]


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN where the other has NaN (a step's initial loss is NaN before the first step)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _same(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return len(got) == len(want) and all(_equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_captured_path_gives_the_eager_results_bitwise_for_every_method(name):
    assert _same(_drive(name, "rerun"), _drive(name, False))


def test_inputs_are_never_written_and_earlier_results_stay_valid():
    method, state, _ = _method()
    update = make_update(method, capture="rerun")
    before = [t.clone() for t in _leaves(state)]
    first, _ = update(state, _batch(seed=1))
    kept = [t.clone() for t in _leaves(first)]
    second, _ = update(first, _batch(seed=2))
    assert _same(_leaves(state), before)
    assert _same(_leaves(first), kept)
    assert not _same(_leaves(second.trainable), _leaves(first.trainable))


def test_passed_through_inputs_come_back_as_the_same_tensors():
    method, state, _ = _method()
    new, _ = make_update(method, capture="rerun")(state, _batch())
    assert all(new.frozen[k] is state.frozen[k] for k in state.frozen)
    assert all(new.source[k] is state.source[k] for k in state.source)
    assert all(new.trainable[k] is not state.trainable[k] for k in state.trainable)


def test_a_new_shape_or_new_passed_through_tensors_record_again():
    method, state, _ = _method()
    update = make_update(method, capture="rerun")
    state, _ = update(state, _batch(4))
    state, _ = update(state, _batch(4, seed=1))
    assert update.recordings() == 1
    state, _ = update(state, _batch(2))
    assert update.recordings() == 2
    moved = state._replace(frozen={k: t.clone() for k, t in state.frozen.items()})
    eager, _ = make_update(method)(moved, _batch(2, seed=3))
    got, _ = update(moved, _batch(2, seed=3))
    assert update.recordings() == 3
    assert _same(_leaves(got), _leaves(eager))


def test_the_least_recently_used_recording_is_dropped():
    fn = captured(lambda x: (x * 2,), backend="rerun", cache_size=2)
    for n in (1, 2, 1, 3, 1, 2):
        (out,) = fn(torch.ones(n))
        assert torch.equal(out, torch.full((n,), 2.0))
    assert fn.recordings() == 4  # 1, 2, 3 recorded; 2 was dropped for 3 and recorded again
    assert len(fn.replays()) == 2


def test_inputs_of_other_strides_reuse_the_recording_and_are_read_correctly():
    fn = captured(lambda x: (x * 2,), backend="rerun")
    square = torch.arange(9.0).reshape(3, 3)
    (first,) = fn(square)
    (second,) = fn(square.t())  # same shape, dtype and device, other strides: copied in, not recorded again
    assert fn.recordings() == 1
    assert torch.equal(first, square * 2) and torch.equal(second, square.t() * 2)


def test_a_replay_alone_recomputes_into_the_recorded_outputs():
    calls = []
    fn = captured(lambda x: (calls.append(1), x * 2)[1], backend="rerun", warmup=1)
    fn(torch.ones(3))
    before = len(calls)
    (replay,) = fn.replays()
    replay()
    assert len(calls) == before + 1


def test_auto_runs_eagerly_off_cuda_and_bad_options_are_refused():
    fn = captured(lambda x: x + 1)
    assert torch.equal(fn(torch.zeros(2)), torch.ones(2)) and fn.recordings() == 0
    assert maybe_captured(len, False) is len
    with pytest.raises(ValueError, match="backend must be one of"):
        captured(len, backend="graph")
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        captured(len, warmup=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cuda_graph_replays_match_the_eager_step_and_repeat_bitwise(name):
    captured_run = _drive(name, True, "cuda")
    assert _same(captured_run, _drive(name, True, "cuda"))
    for got, want in zip(captured_run, _drive(name, False, "cuda"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_capture_records_once_per_shape_and_explains_an_uncapturable_step():
    method, state, _ = _method(device="cuda")
    update = make_update(method, capture=True)
    for seed in range(3):
        state, _ = update(state, _batch(seed=seed, device="cuda"))
    assert update.recordings() == 1
    # a failed capture can leave the CUDA context unusable, so it fails in a process of its own
    code = "import torch; from yolozu.functional.capture import captured\n"
    code += "captured(lambda x: x * float(x.sum()))(torch.ones(3, device='cuda'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert done.returncode != 0 and "cannot be captured as a CUDA graph" in done.stderr


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
