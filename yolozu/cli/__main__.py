"""``python -m yolozu.cli export|eval ...``: the ``yolozu`` command (as docs/distributed.md runs it under torchrun)."""

import sys

from yolozu.cli import main

if __name__ == "__main__":
    sys.exit(main())
