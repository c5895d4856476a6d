#!/usr/bin/env python
"""Plot a TTT log written by ``--ttt-log-out``: loss per step and gradient/update norms.

    python tools/plot_ttt_log.py runs/export/tent/ttt_log.json [--output loss.png]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolozu.demo.plot_log import plot_log  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="a --ttt-log-out JSON file")
    parser.add_argument("--output", help="PNG to write (default: the log's name with .png)")
    args = parser.parse_args(argv)
    try:
        out = plot_log(args.log, args.output or Path(args.log).with_suffix(".png"))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
