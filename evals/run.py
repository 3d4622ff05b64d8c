"""``brmerge eval`` as one call: options in, suites loaded, model scored, table and JSON out.

The command (``search/commands/eval.py``) only parses arguments into :class:`EvalOptions` and
calls :func:`run_eval`. Everything a user can get wrong is checked before the model loads:
the domains, the suite and its data, the ``--json`` folder, the device, the chat template.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks_ptbr.lm_eval_tasks import TASKS_DIR
from benchmarks_ptbr.sources import SUITES  # noqa: F401 - owned there; `brmerge eval --suite` reads it here
from benchmarks_ptbr.suite import Suite, load_suite, resolve_data_dir
from evals.harness import DEFAULT_BATCH_TOKENS, EvalError
from evals.results import EvalResult


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    model: str
    suite: str | None = None            # None: dev with a data directory (or --hub), else sample
    tasks: str | None = None            # comma-separated domains; None: all of the suite
    limit: int | None = None
    gen: bool = False
    data_dir: str | None = None
    hub: bool = False
    num_fewshot: int = 3
    json_path: str | None = None
    device: str = "auto"
    trust_remote_code: bool = False
    chat_template: bool | None = None   # None: leaderboard: on if the model has a template
    leaderboard_era: str = "2025"       # leaderboard.ERAS: the budget of the current runs
    batch_size: int = 8                 # generation batch (the log-likelihood path sizes itself)
    dtype: str = "auto"                 # merge_core.dtypes.COMPUTE_DTYPES: auto = checkpoint's on CUDA, float32 on CPU
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS   # the log-likelihood path's KV budget per forward
    extra_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def suite_name(self) -> str:
        return self.suite or ("dev" if (resolve_data_dir(self.data_dir) or self.hub) else "sample")

    @property
    def use_chat_template(self) -> bool | None:
        """True/False, or None: the leaderboard suite decides by the model's template."""
        if self.chat_template is None and self.suite_name != "leaderboard":
            return False
        return self.chat_template

    @property
    def generation(self) -> bool:
        return self.gen or self.suite_name == "leaderboard"  # the Leaderboard scores by generation


def parse_domains(text: str | None) -> list[str] | None:
    """``"legal,enem"`` -> ``["legal", "enem"]``; ``None`` means every domain of the suite."""
    if text is None:
        return None
    domains = [d.strip() for d in text.split(",") if d.strip()]
    if not domains:
        raise EvalError(f"--tasks {text!r} names no domain; give e.g. --tasks legal,enem "
                        "(or leave --tasks out for every domain)")
    return domains


def check_json_path(path: str | None) -> Path | None:
    """The ``--json`` file, checked before any scoring (its folder is made when the results are
    written: a failed evaluation leaves no empty folder behind)."""
    if path is None:
        return None
    out = Path(path).expanduser()
    if out.is_dir():
        raise EvalError(f"--json {path}: is a folder; give a file name such as {out / 'eval.json'}")
    folder = out.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise EvalError(f"--json {path}: {existing} is a file, not a folder; choose another path")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise EvalError(f"--json {path}: cannot write in {existing}; choose a writable folder")
    return out


def write_json(path: Path, data: object) -> None:
    """``data`` as JSON at ``path``, whole or not at all (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_suites(options: EvalOptions) -> list[Suite]:
    """The suites the options name (the sample suite is two: dev and test)."""
    suite = options.suite_name
    if suite not in SUITES:
        raise EvalError(f"--suite {suite}: choose from {', '.join(SUITES)}")
    if options.limit is not None and options.limit < 1:
        raise EvalError(f"--limit {options.limit}: give a positive number of items per task")
    if options.num_fewshot < 0:
        raise EvalError(f"--num-fewshot {options.num_fewshot}: give 0 or more examples")
    common = {"domains": parse_domains(options.tasks), "limit": options.limit,
              "num_fewshot": options.num_fewshot}
    data_dir = resolve_data_dir(options.data_dir)
    if suite == "sample":
        return [load_suite(split=s, source="sample", **common) for s in ("dev", "test")]
    if options.hub:
        if suite == "leaderboard":
            raise EvalError("--suite leaderboard reads the data directory, not the hub; drop "
                            "--hub and pass --data-dir DIR")
        return [load_suite(split=suite, source="hub", **common)]
    if data_dir is None:
        raise EvalError(f"--suite {suite} needs the PT-BR data: pass --data-dir DIR or set "
                        "BRMERGE_DATA_DIR (or use --suite sample)")
    if suite == "leaderboard":
        return [load_suite(split="leaderboard", source="leaderboard", data_dir=data_dir,
                           **common)]
    return [load_suite(split=suite, source="data", data_dir=data_dir, **common)]


def load_tokenizer(model_id: str, *, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    if model_id.startswith(("/", ".", "~")) and not Path(model_id).expanduser().is_dir():
        raise EvalError(f"model folder {model_id!r} does not exist; pass a local model folder "
                        "or a Hugging Face id such as org/name")
    try:
        return AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:   # transformers: no files (OSError), no usable tokenizer (ValueError)
        raise EvalError(f"cannot load the tokenizer of {model_id!r}: {_first_line(exc)}; pass a "
                        "folder with config.json, safetensors weights and tokenizer files") from exc


def _checkpoint_dtype(model_id: str, *, trust_remote_code: bool) -> str | None:
    """The dtype the model's config declares (``dtype``, formerly ``torch_dtype``), or None."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(declared).removeprefix("torch.") if declared is not None else None


def load_model(model_id: str, *, device: Any, trust_remote_code: bool, dtype: str = "auto") -> Any:
    from transformers import AutoModelForCausalLM

    from merge_core.dtypes import compute_dtype

    # auto: float32 on CPU (bf16 matmuls are slow there); the checkpoint's dtype on GPU.
    declared = (_checkpoint_dtype(model_id, trust_remote_code=trust_remote_code)
                if dtype == "auto" and device.type == "cuda" else None)
    dtype = compute_dtype(dtype, checkpoint_dtype=declared, device=device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise EvalError(f"cannot load model {model_id!r}: {_first_line(exc)}; pass a folder with "
                        "config.json, safetensors weights and tokenizer files") from exc
    return model.to(device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def merge_results(results: Sequence[EvalResult]) -> EvalResult:
    """One result from several suites' (the sample suite's dev and test)."""
    merged = EvalResult(tasks={}, items=[], skipped={}, meta=dict(results[0].meta))
    for key in ("indices", "dev_overlap"):
        merged.meta[key] = {}
    for r in results:
        merged.tasks.update(r.tasks)
        merged.items.extend(r.items)
        merged.skipped.update(r.skipped)
        for key in ("indices", "dev_overlap"):
            merged.meta[key].update(r.meta.get(key, {}))
    merged.meta["split"] = ",".join(r.meta["split"] for r in results)
    return merged


def format_table(result: EvalResult) -> str:
    """One row per task, then what was not scored and which items overlap dev."""
    norm = result.meta.get("normalized") or {}  # the Leaderboard's displayed score, beside acc
    rows = [("task", "domain", "items", "accuracy", "gold_prob", "chance")
            + (("normalized",) if norm else ())]
    for name, m in result.tasks.items():
        rows.append((name, m.domain, str(m.n), f"{m.acc:.3f}",
                     "-" if m.gold_prob is None else f"{m.gold_prob:.3f}", f"{m.chance:.3f}")
                    + ((f"{norm[name]:.3f}" if name in norm else "-",) if norm else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    skipped = {t: {k: v for k, v in s.items() if v} for t, s in result.skipped.items()}
    notes = [f"{t}: " + ", ".join(f"{k} {v}" for k, v in s.items()) for t, s in skipped.items() if s]
    if notes:
        lines += ["", "not scored: " + "; ".join(notes)]
    if norm:
        from benchmarks_ptbr.leaderboard import item_set_notes

        lines += item_set_notes(result.meta.get("n_available") or {})
    overlap = result.meta.get("dev_overlap") or {}
    for name, n in overlap.items():
        lines.append(f"dev overlap: {n} of {result.tasks[name].n} {name} items are also in the "
                     "dev split; a campaign searched on dev is optimistic on them")
    return "\n".join(lines)


def stock_command(options: EvalOptions, suites: Sequence[Suite]) -> str | None:
    """The stock ``lm_eval`` command that scores the same items, or None (hub items have no
    lm-eval task here)."""
    if any(s.source == "hub" for s in suites):
        return None
    generation = options.generation
    names, samples = [], {}
    for suite in suites:
        for task in suite.tasks:
            name = task.name + ("_gen" if generation and suite.source != "leaderboard" else "")
            names.append(name)
            samples[name] = list(task.indices)
    model_args = f"pretrained={options.model}"
    if options.trust_remote_code:
        model_args += ",trust_remote_code=True"
    if options.dtype != "auto":
        model_args += f",dtype={options.dtype}"
    args = ["lm_eval", "--model", "hf", "--model_args", model_args,
            "--include_path", str(TASKS_DIR), "--tasks", ",".join(names),
            "--num_fewshot", str(options.num_fewshot)]
    metadata: dict[str, Any] = {}
    data_dir = next((s.data_dir for s in suites if s.data_dir is not None), None)
    if data_dir is not None:
        metadata["data_dir"] = str(data_dir)
    if options.num_fewshot != 3:
        metadata["num_fewshot"] = options.num_fewshot  # the task's items exclude these shots
    if metadata:
        args += ["--metadata", json.dumps(metadata)]
    if options.use_chat_template:
        args += ["--apply_chat_template", "--fewshot_as_multiturn"]
    if options.limit is not None:
        args += ["--samples", json.dumps(samples, separators=(",", ":"))]
    return shlex.join(args)


def run_eval(options: EvalOptions, *, echo: Callable[[str], None] = print) -> EvalResult:
    """Score ``options.model`` as ``brmerge eval`` does; prints the table and the stock
    ``lm_eval`` command, writes ``--json``; returns the merged result."""
    from merge_core.devices import resolve_device

    parse_domains(options.tasks)
    json_path = check_json_path(options.json_path)
    suites = load_suites(options)  # validate the items before loading a model
    device = resolve_device(options.device)
    tokenizer = load_tokenizer(options.model, trust_remote_code=options.trust_remote_code)
    if options.suite_name == "leaderboard":
        from benchmarks_ptbr.leaderboard import budget
        from evals.generate import resolve_chat

        budget(options.leaderboard_era, 4096)  # an unknown era fails before the model loads
        chat_type = resolve_chat(tokenizer, options.use_chat_template, model=options.model)
        echo(f"chat template: on ({chat_type})" if chat_type else
             "chat template: off (" + ("--no-chat-template" if options.chat_template is False
                                       else f"{options.model} has none that renders") + ")")
        from dataclasses import replace

        options = replace(options, chat_template=chat_type is not None)  # decided: now explicit
    elif options.use_chat_template:
        from evals.chat import require_chat_template

        require_chat_template(tokenizer, model=options.model)
    model = load_model(options.model, device=device, trust_remote_code=options.trust_remote_code,
                       dtype=options.dtype)
    results = []
    for suite in suites:
        if options.generation:
            from evals.generate import evaluate_generation

            results.append(evaluate_generation(model, tokenizer, suite, progress=True,
                                               batch_size=options.batch_size,
                                               chat_template=options.use_chat_template,
                                               era=options.leaderboard_era))
        else:
            from evals.harness import Evaluator

            evaluator = Evaluator(tokenizer, suite, purpose="report", allow_test=True,
                                  chat_template=options.use_chat_template,
                                  batch_tokens=options.max_batch_tokens)
            results.append(evaluator.evaluate(model, progress=True))
    result = merge_results(results)
    result.meta["model"] = options.model
    result.meta.update(options.extra_meta)
    command = stock_command(options, suites)
    result.meta["lm_eval_command"] = command
    echo(format_table(result))
    if command:
        echo("")
        echo("the same items with stock lm-eval:")
        echo(command)
    if json_path is not None:
        write_json(json_path, result.to_json())
        echo(f"wrote {json_path}")
    return result
