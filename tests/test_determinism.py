"""The same seed gives identical losses and parameters, in one process and across two."""

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = """
import hashlib, json, sys, torch
sys.path.insert(0, {tests!r})
from toy import TinyAutoencoder, TinyClassifier, TensorAdapter, seeded
from yolozu.tta import TTTConfig, run_ttt

def run(method, factory, seed):
    model = seeded(factory, 0)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 16, 16, generator=g) for _ in range(4)]
    config = TTTConfig(enabled=True, method=method, lr=1e-2, steps=2, batch_size=2, seed=seed,
                       mim_patch_size=4, mim_mask_prob=0.5)
    report = run_ttt(TensorAdapter(model), images, config)
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode()); digest.update(t.numpy().tobytes())
    return {{"losses": [float(v).hex() for v in report.losses], "params": digest.hexdigest()}}

RESULT = {{m: run(m, f, 7) for m, f in (("tent", TinyClassifier), ("mim", TinyAutoencoder))}}
"""


def _run_in_subprocess() -> dict:
    code = SCRIPT.format(tests=str(Path(__file__).parent)) + "print(json.dumps(RESULT))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _run_here() -> dict:
    namespace: dict = {}
    code = SCRIPT.format(tests=str(Path(__file__).parent))
    exec(compile(code, "determinism", "exec"), namespace)
    return namespace["RESULT"]


def test_same_seed_same_losses_and_params_in_one_process_and_across_two():
    here_a = _run_here()
    torch.rand(10)  # unrelated global RNG use in between must not matter
    here_b = _run_here()
    assert here_a == here_b
    first, second = _run_in_subprocess(), _run_in_subprocess()
    assert first == second == here_a


def test_a_different_seed_changes_the_mim_masks():
    from toy import TensorAdapter, TinyAutoencoder, seeded

    from yolozu.tta import TTTConfig, run_ttt

    def losses(seed):
        model = seeded(TinyAutoencoder)
        images = [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        config = TTTConfig(
            enabled=True, method="mim", lr=1e-2, batch_size=2, seed=seed, mim_patch_size=4, mim_mask_prob=0.5
        )
        return run_ttt(TensorAdapter(model), images, config).losses

    assert losses(1) == losses(1)
    assert losses(1) != losses(2)
