"""Source training of the built-in detector on freshly rendered synthetic images (CPU, minutes).

Every step renders a new batch with ``yolozu.demo.synth.render_sample`` (photometric background jitter on)
from a seeded stream, mirrors each image with probability 1/2 (boxes mirrored, class kept, so the detector
is flip-equivariant for test-time augmentation and CoTTA), and minimises the CenterNet loss. Every
``mim_every``-th step it also trains the MIM decoder: block-mask the clean batch and reconstruct it (MSE on
the masked pixels), so masked-image-modelling TTT has a trained reconstruction path. The LoRA branches stay
frozen at zero: they are for test-time adaptation only.

Reproducible for a seed and a thread count (CPU kernels may round differently with another thread count).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import attrs
import numpy as np
import torch
from torch import Tensor, nn

from yolozu.adapters.detector import DetectorAdapter
from yolozu.data import build_manifest
from yolozu.demo.synth import SynthSpec, render_sample, write_split
from yolozu.functional.losses import masked_reconstruction_loss
from yolozu.functional.masking import apply_mask, block_mask
from yolozu.functional.rng import fold_in, key
from yolozu.metrics import evaluate
from yolozu.models.checkpoint import DEFAULT_CHECKPOINT, build_detector, save_detector
from yolozu.models.detector import OUTPUT_STRIDE, CenterNetDetector, count_parameters
from yolozu.models.losses import detection_loss
from yolozu.models.targets import build_targets


@attrs.frozen
class TrainConfig:
    """Everything that decides the trained weights (recorded in the checkpoint's JSON sidecar)."""

    seed: int = 0
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    flip_prob: float = 0.5
    mim_every: int = 2
    mim_weight: float = 1.0
    mim_patch_sizes: tuple[int, ...] = (8, 16)
    mim_prob: float = 0.5
    threads: int = 2


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to 0 at ``steps`` (Loshchilov & Hutter 2017)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def flip_labels(labels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Labels of the horizontally mirrored image: ``cx -> 1 - cx``, everything else kept."""
    return [{**obj, "cx": 1.0 - float(obj["cx"])} for obj in labels]


def render_batch(rng: np.random.Generator, spec: Any, batch_size: int, flip_prob: float) -> tuple[Tensor, list]:
    """A fresh training batch ``(B, 3, S, S)`` in [0, 1] and its labels, randomly mirrored."""
    images, labels = [], []
    for _ in range(batch_size):
        img, objs = render_sample(rng, spec, "train", jitter=True)
        if rng.random() < flip_prob:
            img, objs = img[:, ::-1], flip_labels(objs)
        images.append(np.ascontiguousarray(img))
        labels.append(objs)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(), labels


def _freeze_running_stats(model: nn.Module, frozen: bool) -> None:
    """BatchNorm keeps normalising with batch statistics but, when ``frozen``, leaves its running stats alone."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0 if frozen else 0.1


def mim_loss(model: CenterNetDetector, x: Tensor, step: int, config: TrainConfig) -> Tensor:
    """Masked-image-modelling loss: reconstruct ``x`` from a block-masked copy, MSE on the masked pixels.

    The masked batch does not update BatchNorm running statistics, so they describe clean images only.
    """
    k = fold_in(key(config.seed), step)
    patch = config.mim_patch_sizes[step // config.mim_every % len(config.mim_patch_sizes)]
    mask = block_mask(k, x.shape[0], x.shape[2], x.shape[3], patch_size=patch, mask_prob=config.mim_prob)
    _freeze_running_stats(model, True)
    try:
        recon = model(apply_mask(x, mask), recon=True)["recon"]
    finally:
        _freeze_running_stats(model, False)
    return masked_reconstruction_loss(recon, x, mask)


def train(model: CenterNetDetector, spec: Any, config: TrainConfig, *, log_every: int = 50) -> dict[str, Any]:
    """Train ``model`` in place for ``config.steps`` steps; returns a summary (losses, images seen, seconds)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x7EA1]))
    trainable = [p for name, p in model.named_parameters() if "lora" not in name]
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    height = width = model.image_size // OUTPUT_STRIDE
    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    history: list[dict[str, float]] = []
    running: dict[str, float] = {}
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        x, labels = render_batch(rng, spec, config.batch_size, config.flip_prob)
        targets = build_targets(labels, num_classes=model.num_classes, height=height, width=width)
        losses = detection_loss(model(x), targets)
        loss = losses["loss"]
        metrics = {"heatmap": float(losses["heatmap"].detach()), "box": float(losses["box"].detach())}
        if config.mim_every > 0 and step % config.mim_every == 0:
            recon = mim_loss(model, x, step, config)
            loss = loss + config.mim_weight * recon
            metrics["mim"] = float(recon.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        for name, value in metrics.items():
            running[name] = running.get(name, 0.0) + value
        if (step + 1) % log_every == 0 or step + 1 == config.steps:
            mim_steps = sum(1 for s in range(step + 1 - log_every, step + 1) if s >= 0 and s % config.mim_every == 0)
            row = {
                "step": step + 1,
                "seconds": round(time.perf_counter() - start, 1),
                **{n: round(v / (mim_steps if n == "mim" else log_every), 4) for n, v in running.items()},
            }
            history.append(row)
            print(json.dumps(row), flush=True)
            running = {}
    model.eval()
    return {
        "train_seconds": round(time.perf_counter() - start, 1),
        "train_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "images_seen": config.steps * config.batch_size,
        "history": history,
    }


def evaluate_on(model: CenterNetDetector, root: Path, split: str) -> dict[str, Any]:
    """COCO mAP of ``model`` on a written split (via the detector adapter's loading and decoding)."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.pt"
        save_detector(model, ckpt)
        adapter = DetectorAdapter(ckpt)
    records = build_manifest(root, split)
    report = evaluate(adapter.predict(records), records)
    return {"root": str(root), "split": split, **report}


def validation_split(root: Path, spec: Any, seed: int, n_val: int) -> tuple[Path, str, bool]:
    """Where to evaluate: ``<root>/images/val`` if present, else a val split written to a temporary folder."""
    if (root / "images" / "val").is_dir():
        return root, "val", False
    tmp = Path(tempfile.mkdtemp(prefix="yolozu-val-"))
    write_split(tmp, "val", n_val, seed=seed, spec=spec)
    return tmp, "val", True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description="Train the built-in detector on rendered synthetic digit images (CPU).")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of weights, image stream and masks")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the val split (as make_demo_data writes it)")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--mim-every", type=int, default=defaults.mim_every, help="MIM loss every N steps (0: never)")
    p.add_argument("--mim-weight", type=float, default=defaults.mim_weight)
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads (results depend on it)")
    p.add_argument("--val-root", default="data/demo", help="dataset root whose val split is evaluated")
    p.add_argument("--n-val", type=int, default=300, help="val images to render when --val-root has no val split")
    p.add_argument(
        "--output", default=str(DEFAULT_CHECKPOINT), help="checkpoint path (a .json sidecar is written beside)"
    )
    p.add_argument("--no-eval", action="store_true", help="skip the final val evaluation")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate on clean val, and write the checkpoint and its JSON sidecar."""
    args = parse_args(argv)
    spec = SynthSpec()
    config = TrainConfig(
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        mim_every=args.mim_every,
        mim_weight=args.mim_weight,
        threads=args.threads,
    )
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = build_detector({"image_size": spec.image_size})
    print(
        f"detector: {count_parameters(model)} parameters; training {config.steps} steps x {config.batch_size}",
        flush=True,
    )
    summary = train(model, spec, config)
    output = Path(args.output)
    save_detector(model, output)
    record: dict[str, Any] = {
        "command": shlex.join(
            [
                "python",
                sys.argv[0] if argv is None else "tools/train_detector.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "architecture": model.config,
        "parameters": count_parameters(model),
        "data_seed": args.data_seed,
        "synth_spec": attrs.asdict(spec),
        "image_size": spec.image_size,
        "train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.asdict(config).items()},
        "lr_schedule": f"linear warm-up {config.warmup_steps} steps, cosine to 0; AdamW",
        "augmentation": "fresh render_sample(jitter=True) images every step; horizontal flip p=0.5",
        "steps": config.steps,
        "images_seen": summary["images_seen"],
        "train_seconds": summary["train_seconds"],
        "train_cpu_seconds": summary["train_cpu_seconds"],
        "timing_note": "wall seconds grow when other processes share the cores; cpu seconds are summed over threads",
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "torch": torch.__version__,
        "history": summary["history"],
    }
    if not args.no_eval:
        root, split, temporary = validation_split(Path(args.val_root), spec, args.data_seed, args.n_val)
        try:
            report = evaluate_on(model, root, split)
        finally:
            if temporary:
                shutil.rmtree(root, ignore_errors=True)
        if temporary:
            report["root"] = f"val split rendered with data seed {args.data_seed} ({args.val_root} had none)"
        record["clean_val"] = report
        print(json.dumps({"clean_val": report}), flush=True)
    sidecar = output.with_suffix(".json")
    sidecar.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output} and {sidecar}", flush=True)
    return 0
