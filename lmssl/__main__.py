"""The command line: `lmssl run | validate | results | push | report | fields`, also as `python -m lmssl` and under
`accelerate launch -m lmssl run ...`. User mistakes print one paragraph and exit with code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from lmssl.errors import LmsslError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmssl", description="Self-supervised pretraining from one recipe file.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe's stages in order (skipping up-to-date ones)")
    run.add_argument("recipe", help="path to a recipe YAML file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field, e.g. stages.pretrain.max_steps=100 (repeatable)")
    run.add_argument("--run-dir", help="where stage folders go (default: the recipe's run_dir or runs/<name>)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE", help="re-run this stage even if up to date")

    validate = sub.add_parser("validate", help="check a recipe without running anything")
    validate.add_argument("recipe")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    report = sub.add_parser("report", help="report cards, e.g. `lmssl report tokenizer DIR --data FILE`")
    report.add_argument("what", choices=["tokenizer"], help="what to report on")
    report.add_argument("folder", help="a tokenizer folder (a tokenizer stage's output)")
    report.add_argument("--data", nargs="+", required=True, metavar="FILE",
                        help="held-out text files or globs, one text per line (.xz/.gz read as they are)")
    report.add_argument("--reference", metavar="DIR", help="another tokenizer folder, reported side by side")
    report.add_argument("--encoding", default="utf-8", help="encoding of the text files (latin-1 for some Gutenberg books)")
    report.add_argument("--max-bytes", type=int, default=2_000_000, help="read at most this many bytes of text")

    push = sub.add_parser("push", help="push a finished stage folder (or one model in it) to the Hub")
    push.add_argument("folder", help="RUN_DIR/STAGE, or RUN_DIR/STAGE/TASK for one fine-tuned model")
    push.add_argument("repo_id", help="namespace/name; a stage with several models pushes each to <repo_id>-<name>")
    push.add_argument("--revision", help="branch to push to (made from main when missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")

    results = sub.add_parser("results", help="run the results suite (recipes/results/) and write RESULTS.md")
    results.add_argument("--recipes", default="recipes/results", help="the suite's folder (holds suite.yaml)")
    results.add_argument("--run-dir", default="runs/results", help="where each recipe's stage folders go")
    results.add_argument("--out", default="RESULTS.md", help="the Markdown file to write (plots beside it)")
    results.add_argument("--smoke", action="store_true", help="tiny models and a few steps: the pipeline in minutes")
    results.add_argument("--data-dir", help="the shared data folder, when it is not ../shared/data")

    fields = sub.add_parser("fields", help="list the fields of a stage kind (or the recipe) with their docs")
    fields.add_argument("kind", nargs="?", help="tokenizer, pretrain, finetune, probe, perplexity; omit for the recipe's top level")
    return parser


def _fields(kind: Optional[str]) -> int:
    import dataclasses

    from lmssl.recipe import Recipe
    from lmssl.schema import field_docs, field_range
    from lmssl.stages import STAGES

    if kind and kind not in STAGES:
        raise LmsslError(f"unknown stage kind {kind!r}; known: {', '.join(STAGES)}")
    cls = STAGES[kind].Config if kind else Recipe
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in ("source", "raw"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            default = "{...}"
        bounds = field_range(cls, f.name)
        print(f"{f.name} = {default!r}" + (f"  ({bounds})" if bounds else "") + f"\n    {docs.get(f.name, '')}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fields":
            return _fields(args.kind)
        if args.command == "push":
            from lmssl.sharing import push_command

            print(push_command(args.folder, args.repo_id, args.revision, args.private))
            return 0
        if args.command == "results":
            from lmssl.results import results_command

            print(results_command(args.recipes, args.run_dir, args.out, args.smoke, args.data_dir,
                                  sys.argv[1:] if argv is None else list(argv)))
            return 0
        if args.command == "report":
            if args.max_bytes < 1:
                raise LmsslError(f"--max-bytes: {args.max_bytes} is out of range; it must be >= 1")
            from lmssl.tokenizer_report import report_command

            print(report_command(args.folder, args.data, args.reference, args.encoding, args.max_bytes))
            return 0
        from lmssl import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "validate":
            print(f"{args.recipe}: ok ({len(recipe.stages)} stages: "
                  + ", ".join(f"{s.name} [{s.kind}]" for s in recipe.stages) + ")")
            return 0
        from lmssl.runner import run_recipe
        from lmssl.training import Interrupted

        try:
            run_recipe(recipe, run_dir=args.run_dir, force=tuple(args.force))
        except Interrupted as stop:
            print(f"lmssl: {stop}", file=sys.stderr)
            return 130
        except KeyboardInterrupt:  # a second Ctrl-C: leave at once, the last checkpoint stays
            print("lmssl: stopped at once (second interrupt); run again to resume from the last checkpoint",
                  file=sys.stderr)
            return 130
        return 0
    except LmsslError as err:
        from lmssl.redact import redact_text

        print(f"lmssl: error: {redact_text(str(err))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
