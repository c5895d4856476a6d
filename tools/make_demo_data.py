"""Make the demo shift benchmark under data/demo (see docs/data.md); the logic is yolozu.demo.data.main."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from yolozu.demo.data import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
