#!/usr/bin/env python
"""COCO mAP of a predictions.json on a YOLO-layout dataset; see ``yolozu.cli.eval.main``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolozu.cli.eval import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
