"""tools/compare_corruptions.py: our former corruptions, read from git history, against the package's on the
same images, with pixel statistics and the built-in detector's mAP50."""

from __future__ import annotations

import json

import pytest
from tool_modules import load_tool

from yolozu.demo.synth import SynthSpec, make_dataset


@pytest.fixture(scope="module")
def tool():
    return load_tool("compare_corruptions")


def test_ours_is_found_in_history_and_compared_with_the_package(tool, tmp_path, capsys):
    ours = tool.load_ours(tool.ours_revision())
    assert hasattr(ours, "_frost_texture") and hasattr(ours, "corrupt_with_labels")  # the former implementation
    make_dataset(tmp_path, seed=0, n_train=1, n_val=3, spec=SynthSpec(image_size=48, min_digit=8, max_digit=20))
    out = tmp_path / "compare.json"
    args = ["--dataset", str(tmp_path), "--images", "3", "--corruptions", "fog", "elastic_transform",
            "--severities", "2", "--output", str(out)]
    assert tool.main(args) == 0
    blob = json.loads(out.read_text())
    assert len(blob["ours"]) == 40 and blob["images"] == 3 and 0.0 <= blob["clean_map50"] <= 1.0
    rows = {r["corruption"]: r for r in blob["rows"]}
    assert set(rows) == {"fog", "elastic_transform"}
    for row in rows.values():
        assert row["severity"] == 2 and row["mad_between"] > 0
        for impl in ("ours", "reference"):
            assert row[f"mad_{impl}"] > 0 and 0 < row[f"psnr_{impl}"] < 60 and 0.0 <= row[f"map50_{impl}"] <= 1.0
    assert "| fog |" in capsys.readouterr().out


def test_an_unknown_revision_is_a_clear_error(tool, tmp_path):
    with pytest.raises(SystemExit, match="--ours no-such-rev: git cannot read yolozu/demo/corruptions.py"):
        tool.main(["--dataset", str(tmp_path), "--ours", "no-such-rev"])
