#!/usr/bin/env python
"""Train the built-in detector (see ``yolozu.demo.train``); ``make train`` runs it with the defaults."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolozu.demo.train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
