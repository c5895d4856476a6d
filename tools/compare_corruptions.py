"""Compare two implementations of the ImageNet-C corruptions on the same images: the demo's own (the
``yolozu/demo/corruptions.py`` of a git revision, ``--ours``) and the reference ``imagecorruptions`` package
(imagecorruptions-imaug, COCO-C's implementation).

For each corruption and severity, both corrupt the first ``--images`` images of a split, each image from the
generator the demo data uses for it (seeded by seed, corruption, severity, index), and the tool reports:

- the mean absolute difference of each from the clean image (0-255) and the PSNR against it (dB, from the mean
  squared error over the split): how strong each implementation's corruption is;
- the mean absolute difference between the two outputs (0-255);
- the built-in detector's mAP50 on each (the committed checkpoint unless ``--checkpoint``), with the clean
  split's beside them. Boxes move with the objects under our elastic_transform; the package cannot move them.

    python tools/compare_corruptions.py --dataset data/demo --images 32 --output runs/corruptions/compare.json

``--ours`` defaults to the parent of the commit that replaced our implementation with the package's.

Writes the figures as JSON and prints a markdown table (docs/data.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yolozu.adapters.detector import DetectorAdapter  # noqa: E402
from yolozu.data import build_manifest  # noqa: E402
from yolozu.demo.corruptions import ALL_CORRUPTIONS, SEVERITIES, reference_corrupt  # noqa: E402
from yolozu.demo.synth import image_seed, save_png  # noqa: E402
from yolozu.io.predictions import write_json_atomic  # noqa: E402
from yolozu.metrics import evaluate  # noqa: E402

MODULE = "yolozu/demo/corruptions.py"
MARKER = "def _frost_texture("
"""A function only our implementation had (its procedural frost): the commit that removed it is found by it."""


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def ours_revision() -> str:
    """The last revision with our implementation: the parent of the latest commit that changed ``MARKER``."""
    try:
        commit = _git("log", "-1", "--format=%H", "-S", MARKER, "--", MODULE)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"cannot read git history under {ROOT} ({e}); give --ours REV") from e
    if not commit:
        raise SystemExit(f"no commit in {ROOT}'s history changes {MARKER!r} in {MODULE}; give --ours REV")
    return f"{commit}^"


def load_ours(revision: str) -> ModuleType:
    """``yolozu/demo/corruptions.py`` as it is at git ``revision``, imported under its own name."""
    try:
        source = _git("show", f"{revision}:{MODULE}") + "\n"
    except subprocess.CalledProcessError as e:
        why = e.stderr.strip()
        raise SystemExit(f"--ours {revision}: git cannot read {MODULE} there ({why}); give a commit") from e
    path = Path(tempfile.mkdtemp(prefix="corruptions-ours-")) / "corruptions_ours.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("corruptions_ours", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _psnr(mse: float) -> float | None:
    """PSNR in dB of a mean squared error on 0-255 images (None for identical images)."""
    return None if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _score(adapter: Any, folder: Path, outputs: list[np.ndarray], labels: list[list[dict]]) -> float:
    """mAP50 of ``adapter`` on ``outputs`` with ``labels``, written as PNGs under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (image, objects) in enumerate(zip(outputs, labels)):
        path = folder / f"{i:06d}.png"
        save_png(path, image)
        records.append({"image": str(path), "labels": objects})
    return float(evaluate(adapter.predict(records), records)["map50"])


def compare(
    ours: ModuleType,
    adapter: Any,
    records: list[dict],
    names: Sequence[str],
    severities: Sequence[int],
    seed: int,
    work: Path,
) -> list[dict[str, Any]]:
    """One row per corruption and severity: the pixel statistics and mAP50 of both implementations."""
    clean = [np.asarray(Image.open(r["image"]).convert("RGB")) for r in records]
    rows = []
    for name in names:
        for severity in severities:
            t0 = time.perf_counter()
            made: dict[str, tuple[list[np.ndarray], list[list[dict]]]] = {"ours": ([], []), "reference": ([], [])}
            for i, (image, record) in enumerate(zip(clean, records)):
                rng = np.random.default_rng(image_seed(seed, name, severity, i))
                out, moved = ours.corrupt_with_labels(image, record["labels"], name, severity, rng)
                made["ours"][0].append(out)
                made["ours"][1].append(moved)
                rng = np.random.default_rng(image_seed(seed, name, severity, i))
                made["reference"][0].append(reference_corrupt(image, name, severity, rng))
                made["reference"][1].append(record["labels"])
            row: dict[str, Any] = {"corruption": name, "severity": severity}
            for impl, (outputs, labels) in made.items():
                diff = [o.astype(np.float64) - c for o, c in zip(outputs, clean)]
                row[f"mad_{impl}"] = float(np.mean([np.abs(d).mean() for d in diff]))
                row[f"psnr_{impl}"] = _psnr(float(np.mean([(d**2).mean() for d in diff])))
                row[f"map50_{impl}"] = _score(adapter, work / impl / f"{name}-{severity}", outputs, labels)
            pairs = zip(made["ours"][0], made["reference"][0])
            row["mad_between"] = float(np.mean([np.abs(a.astype(np.float64) - b).mean() for a, b in pairs]))
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            print(
                f"{name} {severity}: MAD ours {row['mad_ours']:.1f} reference {row['mad_reference']:.1f} "
                f"between {row['mad_between']:.1f}; mAP50 ours {row['map50_ours']:.3f} "
                f"reference {row['map50_reference']:.3f}",
                file=sys.stderr,
            )
    return rows


def markdown(rows: list[dict[str, Any]], clean_map50: float, n: int) -> str:
    """Per corruption, severities 1-5 side by side: MAD from clean and mAP50, ours / reference."""
    severities = sorted({r["severity"] for r in rows})
    head = "| corruption | " + " | ".join(f"sev {s}: MAD, mAP50" for s in severities) + " | MAD between, mean |"
    lines = [
        f"Clean mAP50 {clean_map50:.3f} ({n} images). Each cell: mean absolute difference from the clean image "
        "(0-255) and mAP50, ours / reference.",
        "",
        head,
        "|" + " --- |" * (len(severities) + 2),
    ]
    for name in dict.fromkeys(r["corruption"] for r in rows):
        by = {r["severity"]: r for r in rows if r["corruption"] == name}
        cells = [
            f"{by[s]['mad_ours']:.1f} / {by[s]['mad_reference']:.1f}, "
            f"{by[s]['map50_ours']:.3f} / {by[s]['map50_reference']:.3f}"
            for s in severities
        ]
        between = np.mean([by[s]["mad_between"] for s in severities])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {between:.1f} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="data/demo", help="dataset root with images/<split> and labels/<split>")
    p.add_argument("--split", default="val", help="the clean split to corrupt (default val)")
    p.add_argument("--images", type=int, default=64, help="the first N images of the split (default 64)")
    p.add_argument("--ours", default=None, metavar="REV", help="git revision whose corruptions.py is ours "
                   "(default: the last one before the package replaced it)")
    p.add_argument("--corruptions", nargs="+", default=list(ALL_CORRUPTIONS), choices=ALL_CORRUPTIONS)
    p.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES), choices=SEVERITIES)
    p.add_argument("--seed", type=int, default=0, help="the demo data's seed (default 0)")
    p.add_argument("--checkpoint", default=None, help="detector checkpoint (default: the committed one)")
    p.add_argument("--output", default="runs/corruptions/compare.json", help="JSON of every row")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.images < 1:
        raise SystemExit(f"--images must be at least 1, got {args.images}")
    revision = args.ours or ours_revision()
    ours = load_ours(revision)
    if not hasattr(ours, "corrupt_with_labels"):
        raise SystemExit(f"--ours {revision}: its {MODULE} has no corrupt_with_labels; give an older revision")
    records = build_manifest(args.dataset, args.split)[: args.images]
    adapter = DetectorAdapter(args.checkpoint)
    clean = float(evaluate(adapter.predict(records), records)["map50"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compare-corruptions-") as work:
        rows = compare(ours, adapter, records, args.corruptions, args.severities, args.seed, Path(work))
    blob = {
        "ours": _git("rev-parse", revision), "dataset": args.dataset, "split": args.split, "images": len(records),
        "seed": args.seed, "clean_map50": clean, "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
    }
    write_json_atomic(args.output, blob)
    print(markdown(rows, clean, len(records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
