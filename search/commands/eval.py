"""``brmerge eval``: parse, then one call into :func:`evals.run.run_eval`."""

from __future__ import annotations

import argparse

from merge_core.devices import add_device_option

HELP = ("Score a model on the PT-BR suites (sample, dev, test, or the Open PT LLM Leaderboard's "
        "ENEM and OAB) and print accuracy per task.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from evals.run import SUITES

    parser.add_argument("model", metavar="MODEL", help="local model folder or Hugging Face id")
    parser.add_argument("--suite", choices=SUITES, default=None,
                        help="sample: the shipped sample suite (dev and test); dev/test: that "
                             "split of the data directory; leaderboard: ENEM and OAB as the Open "
                             "PT LLM Leaderboard scores them (generation, chat template). Default: "
                             "dev if a data directory is given (flag or $BRMERGE_DATA_DIR), else "
                             "sample")
    parser.add_argument("--tasks", default=None, metavar="DOMAINS",
                        help="comma-separated domains: legal,health,enem,healthbench "
                             "(default: all of the suite)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="at most N items per task, stratified by exam (deterministic)")
    parser.add_argument("--gen", action="store_true",
                        help="score by greedy generation + answer-letter extraction (slower)")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                        help="render prompts with the model's chat template, shots as turns, "
                             "as lm_eval --apply_chat_template --fewshot_as_multiturn "
                             "(default: on for --suite leaderboard, else off)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="PT-BR data directory (default: $BRMERGE_DATA_DIR)")
    parser.add_argument("--hub", action="store_true",
                        help="read dev/test items from the Hugging Face datasets instead of a "
                             "data directory (legal and enem only; needs hub access)")
    parser.add_argument("--num-fewshot", type=int, default=3, metavar="K",
                        help="few-shot examples per prompt (default 3)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write results as JSON")
    add_device_option(parser, what="the model runs")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model repository's own Python code (off by default)")


def run(args: argparse.Namespace) -> int:
    from evals.run import EvalOptions, run_eval

    run_eval(EvalOptions(
        model=args.model, suite=args.suite, tasks=args.tasks, limit=args.limit, gen=args.gen,
        data_dir=args.data_dir, hub=args.hub, num_fewshot=args.num_fewshot, json_path=args.json,
        device=args.device, trust_remote_code=args.trust_remote_code,
        chat_template=args.chat_template))
    return 0
