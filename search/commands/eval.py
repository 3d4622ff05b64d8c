"""``brmerge eval``: parse, then one call into :func:`evals.run.run_eval`."""

from __future__ import annotations

import argparse

from merge_core.devices import add_device_option

HELP = ("Score a model on the PT-BR suites (sample, dev, test, or the Open PT LLM Leaderboard's "
        "ENEM and OAB) and print accuracy per task.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from evals.harness import DEFAULT_BATCH_TOKENS
    from evals.run import SUITES
    from merge_core.dtypes import COMPUTE_DTYPES

    parser.add_argument("model", metavar="MODEL", help="local model folder or Hugging Face id")
    parser.add_argument("--suite", choices=SUITES, default=None,
                        help="sample: the shipped sample suite (dev and test); dev/test: that "
                             "split of the data directory; leaderboard: ENEM and OAB by the Open "
                             "PT LLM Leaderboard's rules (generation; ENEM items from another "
                             "transcription, see docs/evaluation.md). Default: "
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
                        help="render prompts with the model's chat template, shots as turns "
                             "(as lm_eval --apply_chat_template --fewshot_as_multiturn; for "
                             "--suite leaderboard as the Leaderboard's harness). Default: "
                             "leaderboard: on when the model has a template, else off")
    parser.add_argument("--leaderboard-era", choices=("2024", "2025"), default="2025",
                        help="--suite leaderboard: the generation budget of the Leaderboard's "
                             "runs of that era (2024: 32 new tokens, max_length 2560; 2025: "
                             "1536 new tokens, max_length 4096; default 2025, the current one)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="PT-BR data directory (default: $BRMERGE_DATA_DIR)")
    parser.add_argument("--hub", action="store_true",
                        help="read dev/test items from the Hugging Face datasets instead of a "
                             "data directory (legal and enem only; needs hub access)")
    parser.add_argument("--num-fewshot", type=int, default=3, metavar="K",
                        help="few-shot examples per prompt (default 3)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write results as JSON")
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES, default="auto",
                        help="the model's compute dtype (default auto: the checkpoint's dtype on "
                             "a GPU, float32 on CPU), as lm_eval --model_args dtype=...")
    parser.add_argument("--max-batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS, metavar="N",
                        help="bound on one forward's KV tokens: rows x (shared few-shot prefix + "
                             f"row) (default {DEFAULT_BATCH_TOKENS}); lower it on a small GPU")
    add_device_option(parser, what="the model runs")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model repository's own Python code (off by default)")


def run(args: argparse.Namespace) -> int:
    from evals.run import EvalOptions, run_eval

    run_eval(EvalOptions(
        model=args.model, suite=args.suite, tasks=args.tasks, limit=args.limit, gen=args.gen,
        data_dir=args.data_dir, hub=args.hub, num_fewshot=args.num_fewshot, json_path=args.json,
        device=args.device, trust_remote_code=args.trust_remote_code,
        chat_template=args.chat_template, leaderboard_era=args.leaderboard_era,
        dtype=args.dtype, max_batch_tokens=args.max_batch_tokens))
    return 0
