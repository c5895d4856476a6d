"""Flags are named as the user typed them and never silently ignored: a bad --ttt-* value names its flag (not a
TTTConfig field), a flag of another mode or method is a usage error instead of a setting recorded in meta that
changed nothing, and the hint for --bn-prior under --ttt names a flag that exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from yolozu.cli import main as cli
from yolozu.cli.export_parser import build_parser


@pytest.fixture()
def dataset(tmp_path) -> Path:
    root = tmp_path / "ds"
    (root / "images" / "val").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "val" / "a.png")
    return root


def _run(capsys, dataset: Path, tmp_path: Path, *flags: str) -> tuple[int, list[str]]:
    code = cli(["export", "--adapter", "detector", "--quiet", "--dataset", str(dataset), "--output",
                str(tmp_path / "p.json"), *flags])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "flags, line",
    [
        (("--ttt", "--ttt-lr", "-1"), "error: --ttt-lr must be"),
        (("--ttt-lr", "1e-3"), "error: --ttt-lr applies to --ttt only; add --ttt or drop it"),
        (("--ttt", "--bn-stats", "batch"), "error: --bn-stats batch applies without --ttt"),
        (("--ttt", "--ttt-method", "tent", "--ttt-eata-fisher-data", "val"),
         "error: --ttt-eata-fisher-data is a setting of --ttt-method eata, not of tent"),
        (("--bn-stats", "batch", "--bn-prior", "4"), "--ttt-bn-mode mix --ttt-bn-prior N"),
    ],
)
def test_a_flag_that_would_be_ignored_or_is_out_of_range_is_named(tmp_path, dataset, capsys, flags, line):
    code, err = _run(capsys, dataset, tmp_path, *flags)
    assert code == 2 and err[0].startswith("usage:") and line in err[-1]
    assert "TTTConfig." not in err[-1] and "--ttt--" not in err[-1]
    assert not (tmp_path / "p.json").exists()


def test_the_hinted_flag_exists():
    options = {s for action in build_parser()._actions for s in action.option_strings}
    assert {"--ttt-bn-prior", "--ttt-bn-mode"} <= options


def test_a_negative_local_rank_is_named_as_such():
    from yolozu.parallel.world import DistributedError, torchrun_env

    with pytest.raises(DistributedError, match="LOCAL_RANK must be >= 0, got -1"):
        torchrun_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"})


@pytest.mark.parametrize("kind", ["folder", "/dev/zero"])
def test_a_checkpoint_that_is_no_file_is_not_called_missing(tmp_path, dataset, capsys, kind):
    ckpt = Path(kind) if kind.startswith("/") else tmp_path
    code, err = _run(capsys, dataset, tmp_path, "--checkpoint", str(ckpt))
    assert code == 1 and len(err) == 1 and "not found" not in err[0]
    assert err[0].startswith(f"error: {ckpt} is not a detector checkpoint: it is ")


def test_an_output_link_that_loops_is_named_a_loop(tmp_path, dataset, capsys):
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    code = cli(["export", "--quiet", "--dataset", str(dataset), "--output", str(loop)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "loops back on itself" in err[-1]


@pytest.mark.parametrize("split", ["/etc", "../other"])
def test_a_split_outside_the_dataset_is_refused(tmp_path, dataset, capsys, split):
    code = cli(["export", "--quiet", "--dataset", str(dataset), "--split", split, "--output", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and f"split {split!r} must be a folder name" in err[0]


def test_a_nul_in_a_predicted_image_path_is_named(tmp_path, capsys):
    from yolozu.io.predictions import PredictionsError, validate_predictions

    with pytest.raises(PredictionsError, match=r"predictions\[0\]\.image: a path cannot hold a NUL character"):
        validate_predictions([{"image": "a\0.png", "detections": []}])
