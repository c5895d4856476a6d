"""The ``yolozu`` console command: ``yolozu export ...`` and ``yolozu eval ...``."""

from __future__ import annotations

import sys

# nothing heavier than sys is imported before main() has installed the SIGINT handler (not even typing: a Ctrl-C
# there would still be Python's traceback)

COMMANDS = {
    "export": "export predictions.json, optionally with test-time training (--ttt) and flip TTA (--tta)",
    "eval": "COCO mAP of a predictions.json on a YOLO-layout dataset",
}
USAGE = "usage: yolozu {export,eval} [options]   (yolozu COMMAND -h: its options)"


def main(argv: list[str] | tuple[str, ...] | None = None) -> int:
    """Run the command ``argv[0]`` names; ``-h`` lists the commands, an unknown one is a usage error (exit 2).
    Ctrl-C at any moment, from the first instant (also inside ``import torch``), is the one line "interrupted"
    and exit 130: the SIGINT handler is installed before anything heavy is imported."""
    from yolozu.runtime import interrupts
    from yolozu.runtime.faults import fault_point

    previous = interrupts.install()
    try:
        fault_point("cli-start")
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        interrupts.uninstall(previous)


def _main(argv: list[str] | tuple[str, ...] | None) -> int:
    from yolozu.runtime import interrupts

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        lines = [f"  {name:<7} {text}" for name, text in COMMANDS.items()]
        print(USAGE + "\n\ncommands:\n" + "\n".join(lines), file=sys.stderr)
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        print(f"error: unknown command {args[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if args[0] == "export":
        _quiet_torch_rendezvous_log()
        from yolozu.cli.export import main as run
    else:
        from yolozu.cli.eval import main as run
    interrupts.check()  # an interrupt some import swallowed
    return run(args[1:])


def _quiet_torch_rendezvous_log() -> None:
    """Under torchrun, silence torch's C++ log unless the user set its level: a rank that finds no peer within
    ``--dist-timeout`` is one error line of ours, where torch would add its retries and a C++ stack. Read when
    torch loads, so it is set before the export imports torch."""
    import os

    if "WORLD_SIZE" in os.environ:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")


if __name__ == "__main__":
    sys.exit(main())
