"""Every file a run reads, decided in one place, so that no output may ever name one of them.

An export reads its model's checkpoint (the one ``--checkpoint`` gives, or the adapter's committed default), the
images and label files of its dataset split, and, for a method that calibrates on in-distribution data (EATA's
``--ttt-eata-fisher-data``), the images and label files of that split too. ``run_inputs`` reads the records of
both splits and lists those files; the command checks its outputs against that list (``yolozu.io.paths``, symbolic
links resolved and hard links compared by inode) before the model runs on any image.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import attrs

from yolozu.data import build_manifest
from yolozu.data.manifest import dataset_files, find_split

Input = tuple[str, str]
"""``(what it is, path)``: how an error names an input, and its file."""


@attrs.frozen
class RunInputs:
    """What a run reads: its ``records`` (already cut to ``--max-images``), the ``calibration`` records of the
    split a method calibrates on (None when it asks for none) and every input ``files`` pair."""

    records: list[dict[str, Any]]
    calibration: list[dict[str, Any]] | None
    files: tuple[Input, ...]


def default_checkpoint(adapter: str) -> Path | None:
    """The checkpoint an adapter reads when ``--checkpoint`` is not given (the built-in detector's committed one),
    None for adapters without one."""
    if adapter == "detector":
        from yolozu.models.checkpoint import DEFAULT_CHECKPOINT

        return DEFAULT_CHECKPOINT
    return None


def model_inputs(adapter: str, checkpoint: str | None) -> list[Input]:
    """The model files a run with ``--adapter adapter --checkpoint checkpoint`` reads (known before any work)."""
    if checkpoint:
        return [("the --checkpoint", str(checkpoint))]
    default = default_checkpoint(adapter)
    return [] if default is None else [(f"the {adapter} adapter's default checkpoint", str(default))]


def run_inputs(args: argparse.Namespace, calibration_split: str | None, num_classes: int | None) -> RunInputs:
    """The records of ``args.dataset``'s split (auto-detected without ``--split``), those of ``calibration_split``
    when a method asks for one, and every file the run reads: the model's and both splits'."""
    split = args.split or find_split(args.dataset)
    records = build_manifest(args.dataset, split, num_classes=num_classes)
    files = model_inputs(args.adapter, args.checkpoint) + dataset_files(args.dataset, split, records)
    calibration = None
    if calibration_split:
        calibration = build_manifest(args.dataset, calibration_split)
        files += [
            (f"{what} (calibration split {calibration_split!r})", path)
            for what, path in dataset_files(args.dataset, calibration_split, calibration)
        ]
    if args.max_images is not None:
        records = records[: args.max_images]
    return RunInputs(records, calibration, tuple(files))
