#!/usr/bin/env python
"""Export predictions.json, optionally after test-time training; see ``yolozu.cli.export`` (or ``yolozu export -h``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolozu.cli.export import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
