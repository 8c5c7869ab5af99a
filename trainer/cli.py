"""``python -m trainer``: train from a JSON config, build the offline test models, print the parameter table."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("trainer")


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("diffusers", "transformers", "urllib3", "botocore", "PIL", "matplotlib", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import load_config, parse_overrides
    from trainer.loop import train

    config = load_config(Path(args.config), parse_overrides(args.set or []))
    _setup_logging(config.debug)
    result = train(config)
    print(f"run folder: {result.run_dir}")
    print(f"final checkpoint: {result.final_checkpoint}")
    if result.zip_path:
        print(f"zip: {result.zip_path}")
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from trainer.models.loading import model_cache_dir
    from trainer.models.tiny import tiny_model_dir

    _setup_logging(False)
    for name in args.names:
        print(tiny_model_dir(name, model_cache_dir(args.cache_dir)))
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    from trainer.config.docs import parameter_table

    print(parameter_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a LoRA from a JSON config (Eden training_args.json files work)")
    train.add_argument("config", help="path of the JSON config")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key; the value is parsed as JSON when it can be (repeatable)")
    train.set_defaults(func=cmd_train)

    tiny = sub.add_parser("tiny-model", help="build the offline tiny test models and print their folders")
    tiny.add_argument("names", nargs="*", default=["tiny-sd15", "tiny-sdxl"])
    tiny.add_argument("--cache-dir", default=None)
    tiny.set_defaults(func=cmd_tiny)

    docs = sub.add_parser("docs", help="print the parameter table (Markdown) generated from the config")
    docs.set_defaults(func=cmd_docs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ValueError as error:
        # User errors (bad config, bad data, missing device) get the message, not a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
