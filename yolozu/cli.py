"""The ``yolozu`` console command: ``yolozu export ...`` and ``yolozu eval ...``."""

from __future__ import annotations

import sys
from typing import Sequence

COMMANDS = {
    "export": "export predictions.json, optionally with test-time training (--ttt) and flip TTA (--tta)",
    "eval": "COCO mAP of a predictions.json on a YOLO-layout dataset",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        lines = [f"  {name:<7} {text}" for name, text in COMMANDS.items()]
        print("usage: yolozu {export,eval} [options]\n\ncommands:\n" + "\n".join(lines), file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    if args[0] == "export":
        from yolozu.export import main as run
    else:
        from yolozu.eval import main as run
    return run(args[1:])


if __name__ == "__main__":
    sys.exit(main())
