"""What each of two gloo ranks runs for tests/test_distributed.py (started with torch.multiprocessing spawn).

Every rank joins one process group, then runs the checks in the same order; rank 0 writes what it measured to
``rank0.json`` (the test process asserts on it), and each rank its exports' exit codes and stderr lines.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from toy import TinyClassifier, seeded

from yolozu.cli.export import main as export_main
from yolozu.parallel.collectives import SharedModel, all_reduce_sum
from yolozu.tta.config import TTTConfig
from yolozu.tta.engine import Adaptation

SPLITS = [(2, 2), (3, 1), (1, 3), (2, 0), (0, 2)]
"""How each step's global batch of images is split between the two ranks (uneven parts; a rank without an image
steps on padding: a copy of the other rank's first image)."""


def _tensors(adaptation: Adaptation) -> dict[str, torch.Tensor]:
    params, buffers = adaptation.prediction_tensors()
    return {**params, **buffers}


def shared_steps() -> dict:
    """Tent with gradients and BatchNorm statistics synchronised, step by step, against one process adapting on
    the concatenated global batch (rank 0 runs the reference itself, with no collective)."""
    rank = dist.get_rank()
    config = TTTConfig(enabled=True, method="tent", optimizer="sgd", lr=0.05, bn_mode="running", seed=0)
    hooks = SharedModel()
    shared = Adaptation(seeded(TinyClassifier), config, shared=hooks)  # its padding hooks: hooks.padded()
    reference = Adaptation(seeded(TinyClassifier), config) if rank == 0 else None
    generator = torch.Generator().manual_seed(7)
    out = {"max_diff_to_reference": [], "ranks_bitwise_equal": [], "loss_diff": []}
    for step, split in enumerate(SPLITS):
        xs = torch.randn(sum(split), 3, 8, 8, generator=generator) * 2 + 0.5
        mine = xs[: split[0]] if rank == 0 else xs[split[0] :]
        padding = len(mine) == 0
        row = shared.adapt(xs[:1] if padding else mine, step, 1, padding=padding)[-1]
        tensors = {k: v.clone() for k, v in _tensors(shared).items()}
        everyone: list = [None, None]
        dist.all_gather_object(everyone, tensors)
        if reference is not None:
            ref_row = reference.adapt(xs, step, 1)[-1]
            ref = _tensors(reference)
            diff = max((tensors[k].double() - ref[k].double()).abs().max().item() for k in ref)
            out["max_diff_to_reference"].append(diff)
            out["ranks_bitwise_equal"].append(all(torch.equal(everyone[0][k], everyone[1][k]) for k in tensors))
            out["loss_diff"].append(abs(row["loss"] - ref_row["loss"]))
    return out


def func_grad_through_all_reduce() -> bool:
    """``torch.func.grad`` through ``all_reduce_sum`` gives what ``torch.autograd`` gives."""
    x = torch.arange(3.0) + dist.get_rank()
    w = torch.tensor([0.5, -1.0, 2.0])

    def f(v: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum((v * x).sum()) ** 2

    by_func = torch.func.grad(f)(w)
    leaf = w.clone().requires_grad_(True)
    (by_autograd,) = torch.autograd.grad(f(leaf), [leaf])
    return bool(torch.allclose(by_func, by_autograd)) and not torch.equal(by_func, torch.zeros(3))


def _export(argv: list[str]) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = export_main(argv)
    return code, err.getvalue().strip().splitlines()


def exports(runs: dict[str, list[str]], out: Path) -> dict:
    """Each of ``runs`` (name -> export argv) under this process group: its exit code and stderr lines."""
    return {name: _export([*argv, "--output", str(out / f"{name}.json")]) for name, argv in runs.items()}


def job(rank: int, world: int, port: int, tmp: str, runs: dict[str, list[str]]) -> None:
    """One rank of the spawned test job: the shared-model steps, ``torch.func.grad``, then the export ``runs``."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {"shared_steps": shared_steps(), "func_grad": func_grad_through_all_reduce()}
        results["exports"] = exports(runs, Path(tmp))
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
