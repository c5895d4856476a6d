"""Compute the source statistics of feature alignment (``--ttt-method align``) beside a checkpoint; the logic is
yolozu.cli.source_stats.main."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from yolozu.cli.source_stats import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
