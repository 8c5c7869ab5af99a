"""``python -m trainer``: train from a JSON config, evaluate a run's checkpoints, build the offline test models, print
the parameter table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.config.docs import parameter_table, readme_table, with_parameter_table
from trainer.config.load import load_config, parse_overrides
from trainer.evaluate.runner import evaluate_run
from trainer.evaluate.settings import EvaluationSettings
from trainer.models.loading import model_cache_dir
from trainer.models.tiny import tiny_model_dir
from trainer.training.loop import train
from trainer.utils.logs import setup_logging


def cmd_train(args: argparse.Namespace) -> int:
    config = load_config(Path(args.config), parse_overrides(args.set or []))
    setup_logging(config.debug)
    result = train(config)
    print(f"run folder: {result.run_dir}")
    print(f"final checkpoint: {result.final_checkpoint}")
    if result.zip_path:
        print(f"zip: {result.zip_path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    setup_logging(args.debug)
    if args.size and len(args.size) > 2:
        raise ValueError(f"--size takes SIDE or WIDTH HEIGHT, got {len(args.size)} numbers")
    given = {"lora_scales": args.lora_scales, "clip_model": args.clip_model}
    settings = EvaluationSettings.parse(
        checkpoints=args.checkpoint, aesthetic_weights=args.aesthetic_weights, device=args.device,
        weight_type=args.weight_type, steps=args.steps, guidance=args.guidance,
        size=(args.size[0], args.size[-1]) if args.size else None, images_per_prompt=args.images_per_prompt,
        n_prompts=args.prompts, seed=args.seed, baseline=not args.no_baseline,
        training_images=args.training_images, base_model=args.base_model,
        **{key: value for key, value in given.items() if value is not None},
    )
    result = evaluate_run(Path(args.run_folder), settings)
    print(f"recommended: {result.recommendation.reason}")
    print(f"report: {result.report_path}")
    print(f"chart: {result.chart_path}")
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    setup_logging(False)
    for name in args.names:
        print(tiny_model_dir(name, model_cache_dir(args.cache_dir)))
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    if args.write_readme is None and args.check_readme is None:
        print(parameter_table())
        return 0
    path = Path(args.write_readme or args.check_readme)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    text = path.read_text(encoding="utf-8")
    if args.check_readme is not None:
        if readme_table(text) != parameter_table():
            print(f"{path}: the parameter table is out of date; run python -m trainer docs --write-readme",
                  file=sys.stderr)
            return 1
        print(f"{path}: the parameter table is up to date")
        return 0
    updated = with_parameter_table(text)
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    print(f"{path}: parameter table {'rewritten' if updated != text else 'already up to date'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a LoRA from a JSON config (Eden training_args.json files work)")
    train.add_argument("config", help="path of the JSON config")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key; the value is parsed as JSON when it can be (repeatable)")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "evaluate", help="score every checkpoint of a run (CLIP adherence, likeness, diversity, aesthetics) and "
        "recommend the best; writes RUN_FOLDER/evaluation/")
    evaluate.add_argument("run_folder", help="the folder of a training run (it holds checkpoints/)")
    evaluate.add_argument("--checkpoint", type=int, nargs="+", action="extend", metavar="STEP",
                          help="evaluate only these checkpoints (training steps); default: all")
    evaluate.add_argument("--lora-scales", type=float, nargs="+", default=None, metavar="SCALE",
                          help="LoRA scales to evaluate each checkpoint at (default: 0.8 1.0)")
    evaluate.add_argument("--clip-model", default=None,
                          help="CLIP model for the scores: hub id or local folder (default: "
                               "openai/clip-vit-large-patch14)")
    evaluate.add_argument("--aesthetic-weights", default=None, metavar="PATH_OR_URL",
                          help="LAION aesthetic-predictor weights (sac+logos+ava1-l14-linearMSE.pth); default: no "
                               "aesthetic score")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda[:N], xpu[:N] or mps (default: auto)")
    evaluate.add_argument("--weight-type", choices=["fp16", "bf16", "fp32"], default=None,
                          help="rendering precision (default: the run's weight_type)")
    evaluate.add_argument("--steps", type=int, default=None,
                          help="denoising steps per image (default: the run's validation_num_inference_steps)")
    evaluate.add_argument("--guidance", type=float, default=None,
                          help="guidance scale (default: the run's validation_guidance_scale)")
    evaluate.add_argument("--size", type=int, nargs="+", default=None, metavar="PX",
                          help="image size: SIDE or WIDTH HEIGHT (default: the run's sample-image size)")
    evaluate.add_argument("--images-per-prompt", type=int, default=2,
                          help="images per prompt, per checkpoint and scale (default: 2)")
    evaluate.add_argument("--prompts", type=int, default=None, metavar="N",
                          help="use only the first N prompts of the concept mode's set of 6 (default: all)")
    evaluate.add_argument("--seed", type=int, default=0, help="prompt i renders with SEED + i (default: 0)")
    evaluate.add_argument("--no-baseline", action="store_true",
                          help="skip rendering the base model without the LoRA (the diversity reference)")
    evaluate.add_argument("--training-images", default=None, metavar="FOLDER",
                          help="prepared dataset or image folder to compare with (default: RUN_FOLDER/dataset)")
    evaluate.add_argument("--base-model", default=None,
                          help="use this base model instead of the one the run names (hub id, folder or file)")
    evaluate.add_argument("--debug", action="store_true", help="verbose logging")
    evaluate.set_defaults(func=cmd_evaluate)

    tiny = sub.add_parser("tiny-model", help="build the offline tiny test models and print their folders")
    tiny.add_argument("names", nargs="*", default=["tiny-sd15", "tiny-sdxl"])
    tiny.add_argument("--cache-dir", default=None)
    tiny.set_defaults(func=cmd_tiny)

    sub.add_parser("benchmark", help="measure training speed and memory (see `python -m trainer benchmark --help`)")

    docs = sub.add_parser("docs", help="print the parameter table (Markdown) generated from the config's docstrings, "
                          "or put it into the README")
    where = docs.add_mutually_exclusive_group()
    where.add_argument("--write-readme", nargs="?", const="README.md", default=None, metavar="PATH",
                       help="rewrite the table between the README's parameter markers (default: README.md)")
    where.add_argument("--check-readme", nargs="?", const="README.md", default=None, metavar="PATH",
                       help="exit 1 when the README's table differs from the config (default: README.md)")
    docs.set_defaults(func=cmd_docs)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["benchmark"]:
        # The benchmark has its own parser (its --help documents every option). It is a tool, imported only when
        # asked for: the runtime never imports trainer.tooling.
        from trainer.tooling.benchmark import main as benchmark_main

        return benchmark_main(argv[1:])
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
