"""Make the demo shift benchmark: clean synthetic train/val splits and corrupted copies of val.

``main`` is the command line of ``tools/make_demo_data.py`` (``make demo-data``). Corrupted splits are
``<root>/images/val-<corruption>-<severity>`` with the val labels alongside (moved with the objects for
elastic_transform, copied otherwise); image ``i`` is corrupted with a generator seeded by
(seed, corruption, severity, i), so any one split regenerates identically on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from yolozu.data.manifest import IMAGE_SUFFIXES, parse_label_file
from yolozu.demo.corruptions import (
    ALL_CORRUPTIONS,
    CORRUPTIONS,
    GEOMETRIC_CORRUPTIONS,
    HELDOUT_CORRUPTIONS,
    MIN_SIDE,
    SEVERITIES,
    corrupt,
    corrupt_with_labels,
)
from yolozu.demo.synth import SynthSpec, format_labels, image_seed, publish_split, save_png, write_split
from yolozu.io.predictions import write_json_atomic

__all__ = ["corrupted_split_name", "write_corrupted_split", "spec_for_size", "main"]

_META = "demo.json"
DEFAULT_N_VAL = 300
"""Clean val images of a new root (the figures of the checkpoints' metadata and of most pages use 300)."""


def corrupted_split_name(corruption: str, severity: int, source: str = "val") -> str:
    """``<source>-<corruption>-<severity>``, e.g. ``val-fog-3``."""
    return f"{source}-{corruption}-{severity}"


def write_corrupted_split(
    root: str | os.PathLike, corruption: str, severity: int, *, seed: int = 0, source: str = "val"
) -> Path:
    """Write a corrupted copy of split ``source``; returns its image folder. Labels are copied, except that
    boxes follow the objects under geometric corruptions (elastic_transform).

    The split is written to temporary folders and moved into place when complete (see ``publish_split``).
    """
    root = Path(root)
    src_img, src_lbl = root / "images" / source, root / "labels" / source
    if not src_img.is_dir():
        raise FileNotFoundError(f"no clean split to corrupt at {src_img}; make it first (run `make demo-data`)")
    blank = np.zeros((MIN_SIDE, MIN_SIDE, 3), np.uint8)
    corrupt(blank, corruption, severity, np.random.default_rng(0))  # validate early
    images = sorted(p for p in src_img.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    name = corrupted_split_name(corruption, severity, source)

    def fill(img_dir: Path, lbl_dir: Path) -> None:
        for i, path in enumerate(images):
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
            rng = np.random.default_rng(image_seed(seed, corruption, severity, i))
            label = src_lbl / f"{path.stem}.txt"
            if corruption in GEOMETRIC_CORRUPTIONS:  # objects move: so do their boxes
                labels = parse_label_file(label) if label.is_file() else []
                out, moved = corrupt_with_labels(img, labels, corruption, severity, rng)
                (lbl_dir / label.name).write_text(format_labels(moved))
            else:
                out = corrupt(img, corruption, severity, rng)
                if label.is_file():
                    shutil.copyfile(label, lbl_dir / label.name)
            save_png(img_dir / f"{path.stem}.png", out)

    publish_split(root, name, fill)
    return root / "images" / name


def spec_for_size(image_size: int) -> SynthSpec:
    """The default spec at another image size, digit sizes scaled in proportion (20-56 px at 160 px)."""
    base = SynthSpec()
    lo = max(4, round(base.min_digit * image_size / base.image_size))
    hi = max(lo, round(base.max_digit * image_size / base.image_size))
    return SynthSpec(image_size=image_size, min_digit=lo, max_digit=hi)


def _corruption_names(items: Sequence[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        group = {"all": CORRUPTIONS, "heldout": HELDOUT_CORRUPTIONS, "none": ()}.get(item)
        if group is None:
            if item not in ALL_CORRUPTIONS:
                raise ValueError(
                    f"unknown corruption {item!r}; use all, heldout, none or names from: {', '.join(ALL_CORRUPTIONS)}"
                )
            group = (item,)
        out += [g for g in group if g not in out]
    return out


def _read_meta(root: Path) -> dict:
    """The settings ``root``'s data was made with (empty for a new root)."""
    path = root / _META
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_meta(root: Path, meta: dict, force: bool, grow: bool = False) -> None:
    """Refuse to mix splits made with different settings in one root (unless ``force``; with ``grow``, a larger
    ``n_val`` is no other setting: val's first images stay the same, see ``main``)."""
    path = root / _META
    if path.is_file() and not force:
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if grow and _grows(diff.get("n_val")):
            del diff["n_val"]
        if diff:
            changes = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
            hint = " (--grow makes val larger)" if set(diff) == {"n_val"} and _grows(diff["n_val"]) else ""
            raise ValueError(
                f"{root} holds data made with other settings ({changes}); pass --force or another --root{hint}"
            )
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, dict(sorted(meta.items())), indent=1)  # atomic: parallel runs may read it meanwhile


def _grows(change: tuple | None) -> bool:
    """Whether a setting's ``(old, new)`` change is an increase (None: no change)."""
    return change is not None and change[0] is not None and change[1] > change[0]


def _images_in(root: Path, split: str) -> int:
    """How many images split ``split`` of ``root`` holds (0 when it is not there)."""
    folder = root / "images" / split
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_demo_data",
        description="Make the demo shift benchmark: synthetic digit detection splits and ImageNet-C "
        "corruptions of val.",
    )
    p.add_argument("--root", default="data/demo", help="output folder (default: data/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=None,
                   help=f"clean val images (default: the root's, {DEFAULT_N_VAL} for a new root)")
    p.add_argument("--grow", action="store_true",
                   help="allow a larger --n-val on a root made with fewer: image i depends only on the seed and i, "
                   "so val's first images stay the same; val and the corruptions asked for are remade at the new size")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument(
        "--corruptions", nargs="+", default=["all", "heldout"], metavar="NAME",
        help="corruption names, 'all' (the 15 test ones), 'heldout' (the 4 validation ones) or 'none' "
        "(default: all heldout)",
    )
    p.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES), metavar="S")
    p.add_argument("--skip-clean", action="store_true", help="do not make the clean train/val splits")
    p.add_argument("--force", action="store_true", help="remake splits that already exist")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: make what is missing under --root and print each split made or skipped."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        names = _corruption_names(args.corruptions)
    except ValueError as e:
        parser.error(str(e))
    bad = [s for s in args.severities if s not in SEVERITIES]
    if bad:
        parser.error(f"severities must be in {list(SEVERITIES)}, got {bad}")
    if args.image_size < MIN_SIDE:
        parser.error(f"--image-size must be at least {MIN_SIDE} (the corruptions' smallest), got {args.image_size}")
    root = Path(args.root)
    t_all = time.perf_counter()
    made = skipped = 0
    try:
        n_val = args.n_val if args.n_val is not None else _read_meta(root).get("n_val", DEFAULT_N_VAL)
        meta = {"seed": args.seed, "n_train": args.n_train, "n_val": n_val, "image_size": args.image_size}
        _check_meta(root, meta, args.force, args.grow)
        spec = spec_for_size(args.image_size)
        jobs: list[tuple[str, object]] = []
        if not args.skip_clean:
            jobs += [("train", ("train", args.n_train)), ("val", ("val", n_val))]
        jobs += [(corrupted_split_name(n, s), (n, s)) for n in names for s in args.severities]
        for split, job in jobs:
            # a split smaller than its source (made before --grow) is remade, so every split of val has its size
            short = args.grow and split != "train" and _images_in(root, split) < n_val
            if (root / "images" / split).is_dir() and not args.force and not short:
                print(f"skip {root / 'images' / split} (exists; --force remakes it)")
                skipped += 1
                continue
            t0 = time.perf_counter()
            if split in ("train", "val"):
                write_split(root, split, job[1], seed=args.seed, spec=spec)  # type: ignore[index]
            else:
                write_corrupted_split(root, job[0], job[1], seed=args.seed)  # type: ignore[index]
            n = sum(1 for _ in (root / "images" / split).iterdir())
            print(f"made {root / 'images' / split}: {n} images in {time.perf_counter() - t0:.1f} s", flush=True)
            made += 1
    except (ValueError, FileNotFoundError) as e:
        print(f"make_demo_data: error: {e}", file=sys.stderr)
        return 1
    print(f"done: {made} splits made, {skipped} skipped, {time.perf_counter() - t_all:.1f} s, under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
