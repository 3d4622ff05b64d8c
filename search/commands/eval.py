"""``brmerge eval``: score a model on the PT-BR suites and print a table (optionally JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = "Score a model on the PT-BR suites (sample, dev or test) and print accuracy per domain."

SUITES = ("sample", "dev", "test")
DEVICES = ("auto", "cpu", "cuda")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="local model folder or Hugging Face id")
    parser.add_argument("--suite", choices=SUITES, default=None,
                        help="sample: the shipped sample suite (dev and test); dev/test: that "
                             "split of the data directory. Default: dev if a data directory is "
                             "given (flag or $BRMERGE_DATA_DIR), else sample")
    parser.add_argument("--tasks", default=None, metavar="DOMAINS",
                        help="comma-separated domains: legal,health,enem,healthbench "
                             "(default: all of the suite)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="at most N items per task, stratified by exam (deterministic)")
    parser.add_argument("--gen", action="store_true",
                        help="score by greedy generation + answer-letter extraction (slower)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="PT-BR data directory (default: $BRMERGE_DATA_DIR)")
    parser.add_argument("--hub", action="store_true",
                        help="read dev/test items from the Hugging Face datasets instead of a "
                             "data directory (legal and enem only; needs hub access)")
    parser.add_argument("--num-fewshot", type=int, default=3, metavar="K",
                        help="few-shot examples per prompt, drawn from dev (default 3)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write results as JSON")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where to run the model (auto: cuda if available)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model repository's own Python code (off by default)")


def _domains(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [d.strip() for d in text.split(",") if d.strip()]


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _load_model(model_id: str, *, device, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # float32 on CPU (bf16 matmuls are slow there); the checkpoint's dtype on GPU.
    dtype = torch.float32 if device.type == "cpu" else "auto"
    if model_id.startswith(("/", ".", "~")) and not Path(model_id).expanduser().is_dir():
        raise FileNotFoundError(f"model folder {model_id!r} does not exist; pass a local model "
                                "folder or a Hugging Face id such as org/name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"cannot load model {model_id!r}: {first}; pass a folder with "
                                "config.json, safetensors weights and tokenizer files") from exc
    return model.to(device), tokenizer


def _suites(args: argparse.Namespace):
    from benchmarks_ptbr.suite import load_suite, resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir)
    suite = args.suite or ("dev" if (data_dir or args.hub) else "sample")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: give a positive number of items per task")
    common = {"domains": _domains(args.tasks), "limit": args.limit,
              "num_fewshot": args.num_fewshot}
    if suite == "sample":
        return [load_suite(split=s, source="sample", **common) for s in ("dev", "test")]
    if args.hub:
        return [load_suite(split=suite, source="hub", **common)]
    if data_dir is None:
        raise ValueError(f"--suite {suite} needs the PT-BR data: pass --data-dir DIR or set "
                         "BRMERGE_DATA_DIR (or use --suite sample)")
    return [load_suite(split=suite, source="data", data_dir=data_dir, **common)]


def _merge(results: list[Any]):
    from evals.results import EvalResult

    merged = EvalResult(tasks={}, items=[], skipped={}, meta=dict(results[0].meta))
    for r in results:
        merged.tasks.update(r.tasks)
        merged.items.extend(r.items)
        merged.skipped.update(r.skipped)
    merged.meta["split"] = ",".join(r.meta["split"] for r in results)
    return merged


def format_table(result: Any) -> str:
    rows = [("task", "domain", "items", "accuracy", "gold_prob", "chance")]
    for name, m in result.tasks.items():
        rows.append((name, m.domain, str(m.n), f"{m.acc:.3f}",
                     "-" if m.gold_prob is None else f"{m.gold_prob:.3f}", f"{m.chance:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    skipped = {t: {k: v for k, v in s.items() if v} for t, s in result.skipped.items()}
    notes = [f"{t}: " + ", ".join(f"{k} {v}" for k, v in s.items()) for t, s in skipped.items() if s]
    if notes:
        lines.append("")
        lines.append("not scored: " + "; ".join(notes))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    suites = _suites(args)  # validate the items before loading a model
    device = _device(args.device)
    model, tokenizer = _load_model(args.model, device=device,
                                   trust_remote_code=args.trust_remote_code)
    results = []
    for suite in suites:
        if args.gen:
            from evals.generate import evaluate_generation

            results.append(evaluate_generation(model, tokenizer, suite, progress=True))
        else:
            from evals.harness import Evaluator

            evaluator = Evaluator(tokenizer, suite, purpose="report", allow_test=True)
            results.append(evaluator.evaluate(model, progress=True))
    result = _merge(results)
    result.meta["model"] = args.model
    print(format_table(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_json(), ensure_ascii=False, indent=2) + "\n",
                       encoding="utf-8")
        print(f"wrote {out}")
    return 0
