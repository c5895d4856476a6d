#!/usr/bin/env python
"""Train FCOS-small (``yolozu.demo.tv_detector``) from random init on the demo data; ``make train-torchvision``.

Trains on ``<data>/images/train`` (horizontal flips, p = 1/2) with AdamW or SGD, a linear warm-up and cosine
decay, evaluates clean val with the project's evaluator through the plug-in adapter the export uses, and writes
the state dict atomically with a JSON sidecar that says how it was made. Reproducible for a seed, a device and
a CPU thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import attrs
import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolozu.adapters import parse_device  # noqa: E402
from yolozu.adapters.detector import load_image  # noqa: E402
from yolozu.adapters.tv_models import import_torchvision  # noqa: E402
from yolozu.data import build_manifest  # noqa: E402
from yolozu.demo.train import flip_labels, learning_rate  # noqa: E402
from yolozu.demo.tv_detector import (  # noqa: E402
    ARCHITECTURE,
    DEFAULT_CHECKPOINT,
    POSTPROCESS,
    adapter,
    build_fcos_small,
)
from yolozu.io.predictions import write_json_atomic  # noqa: E402
from yolozu.metrics import evaluate  # noqa: E402


@attrs.frozen
class FcosConfig:
    """Everything that decides the trained weights (recorded in the sidecar); ``steps`` follows from the data."""

    seed: int = 0
    epochs: int = 10
    batch_size: int = 8
    optimizer: str = "adamw"
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 10.0
    flip_prob: float = 0.5
    threads: int = 1
    steps: int = 0


def load_split(root: Path, split: str) -> tuple[Tensor, list[list[dict[str, Any]]]]:
    """Every image of a split as one uint8 tensor ``(N, 3, H, W)`` (they share a size) and their labels."""
    records = build_manifest(root, split)
    images = np.stack([load_image(record["image"], None) for record in records])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [record["labels"] for record in records]


def to_target(labels: list[dict[str, Any]], height: int, width: int, device: torch.device) -> dict[str, Tensor]:
    """Normalised (cx, cy, w, h) labels -> torchvision targets: boxes (x1, y1, x2, y2) in pixels, class ids."""
    rows = [
        [(o["cx"] - o["w"] / 2) * width, (o["cy"] - o["h"] / 2) * height,
         (o["cx"] + o["w"] / 2) * width, (o["cy"] + o["h"] / 2) * height]
        for o in labels
    ]
    boxes = torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    classes = torch.tensor([int(o["class_id"]) for o in labels], dtype=torch.int64)
    return {"boxes": boxes.to(device), "labels": classes.to(device)}


def make_batch(
    images: Tensor, labels: list, index: np.ndarray, flips: np.ndarray, device: torch.device
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Images ``index`` as floats in [0, 1] on ``device``, those with ``flips`` mirrored (boxes too)."""
    xs, targets = [], []
    height, width = images.shape[-2:]
    for i, flip in zip(index.tolist(), flips.tolist()):
        x = images[i].to(device).float().div_(255.0)
        objects = labels[i]
        if flip:
            x, objects = x.flip(-1), flip_labels(objects)
        xs.append(x)
        targets.append(to_target(objects, height, width, device))
    return xs, targets


def make_optimizer(model: nn.Module, config: FcosConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum 0.9); no weight decay on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=config.lr)


def train(model: nn.Module, data: tuple[Tensor, list], config: FcosConfig, device: torch.device) -> dict[str, Any]:
    """Train ``model`` in place for ``config.epochs`` epochs; prints and returns the mean losses per epoch."""
    images, labels = data
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0xFC05]))
    optimizer = make_optimizer(model, config)
    per_epoch = -(-len(images) // config.batch_size)
    model.train()
    start, cpu_start, step = time.perf_counter(), time.process_time(), 0
    history = []
    for epoch in range(config.epochs):
        order = rng.permutation(len(images))
        flips = rng.random(len(images)) < config.flip_prob
        sums: dict[str, float] = {}
        for b in range(per_epoch):
            part = slice(b * config.batch_size, (b + 1) * config.batch_size)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            losses = model(*make_batch(images, labels, order[part], flips[part], device))
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        row = {
            "epoch": epoch + 1,
            "seconds": round(time.perf_counter() - start, 1),
            "lr": round(learning_rate(step - 1, config), 6),
            **{name: round(value / per_epoch, 4) for name, value in sums.items()},
            "load_1min": round(os.getloadavg()[0], 2),
        }
        history.append(row)
        print(json.dumps(row), flush=True)
    model.eval()
    return {
        "train_seconds": round(time.perf_counter() - start, 1),
        "train_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "images_seen": config.epochs * len(images),
        "history": history,
    }


def save_state_atomic(model: nn.Module, path: Path) -> int:
    """Write ``model``'s state dict (CPU tensors) to ``path`` through a temporary file renamed over it; returns
    the file's size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)  # mkstemp makes it private; a checkpoint is read by others
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def evaluate_checkpoint(path: Path, root: Path, split: str, device: torch.device) -> dict[str, Any]:
    """COCO mAP on a split of the checkpoint as the export loads it (the plug-in factory's adapter)."""
    records = build_manifest(root, split)
    report = evaluate(adapter(checkpoint=path, device=device, batch_size=32).predict(records), records)
    return {"root": str(root), "split": split, **report}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    d = FcosConfig()
    p = argparse.ArgumentParser(description="Train FCOS-small from random init on the demo data (CPU or CUDA).")
    p.add_argument("--data", default="data/demo", help="dataset root: trains on images/train, evaluates images/val")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the weights, the order and the flips")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument(
        "--threads", type=int, default=d.threads,
        help="torch CPU threads (results depend on it; 1 is fastest on shared cores)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--out", default=str(DEFAULT_CHECKPOINT), help="checkpoint path (a .json sidecar beside it)")
    p.add_argument("--no-eval", action="store_true", help="skip the clean val evaluation")
    return p.parse_args(argv)


def describe(args: argparse.Namespace, argv: Sequence[str] | None, config: FcosConfig, model: nn.Module) -> dict:
    """The sidecar's account of the run, before its results: command, settings, architecture, software."""
    given = sys.argv[1:] if argv is None else list(argv)
    return {
        "command": shlex.join(["python", "tools/train_torchvision.py", *given]),
        "model": "torchvision.models.detection.FCOS, random init (weights=None, nothing downloaded)",
        "architecture": ARCHITECTURE,
        "postprocess": POSTPROCESS,
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": args.data,
        "train": attrs.asdict(config),
        "lr_schedule": f"linear warm-up {config.warmup_steps} steps, cosine to 0 at step {config.steps}",
        "augmentation": "horizontal flip p=0.5 (boxes mirrored)",
        "device": args.device,
        "torch": torch.__version__,
        "torchvision": import_torchvision().__version__,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform()},
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Train, write the checkpoint, evaluate it on clean val, write the sidecar."""
    args = parse_args(argv)
    device = parse_device(args.device)
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    data = load_split(root, "train")
    per_epoch = -(-len(data[0]) // args.batch_size)
    config = FcosConfig(
        seed=args.seed, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, threads=args.threads,
        steps=args.epochs * per_epoch,
    )
    torch.manual_seed(config.seed)
    model = build_fcos_small(num_classes=1 + max(o["class_id"] for objs in data[1] for o in objs)).to(device)
    record = describe(args, argv, config, model)
    print(f"fcos_small: {record['parameters']} parameters; {config.epochs} epochs x {per_epoch} steps "
          f"of {config.batch_size} on {device}", flush=True)
    summary = train(model, data, config, device)
    out = Path(args.out)
    record["checkpoint_bytes"] = save_state_atomic(model, out)
    record.update(summary, load_average_at_end=[round(v, 2) for v in os.getloadavg()])
    record["timing_note"] = "wall seconds grow when other processes share the cores; cpu seconds sum the threads"
    if not args.no_eval:
        record["clean_val"] = evaluate_checkpoint(out, root, "val", device)
        print(json.dumps({"clean_val": record["clean_val"]}), flush=True)
    sidecar = write_json_atomic(out.with_suffix(".json"), record, indent=2)
    print(f"wrote {out} and {sidecar}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
