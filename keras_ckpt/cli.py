"""Command line: `python -m keras_ckpt demo | inspect DIR`."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m keras_ckpt",
        description="keras-ckpt: Keras callbacks that make training safe to interrupt and "
                    "exact to resume.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a tiny model with the callbacks and report")
    demo.add_argument("--out", default="keras_ckpt_demo",
                      help="directory for the demo's checkpoints and report")
    demo.add_argument("--epochs", type=int, default=6, help="epochs to train (default 6)")
    inspect = commands.add_parser("inspect", help="list the checkpoints in a directory")
    inspect.add_argument("directory", help="a checkpoint directory")
    inspect.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        from keras_ckpt.demo import run_demo

        return run_demo(out=args.out, epochs=args.epochs)
    if args.command == "inspect":
        from keras_ckpt.inspect import run_inspect

        return run_inspect(args.directory, as_json=args.json)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
