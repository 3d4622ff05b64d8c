"""The campaign file: a validated, frozen configuration with every error reported at once.

``brmerge init`` writes ``TEMPLATE``; ``load_campaign`` reads one. Each default lives in
``DEFAULTS`` with a one-line reason.
"""

from __future__ import annotations

import copy
import importlib.resources
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks_ptbr.sources import DOMAINS, SUITES as EVAL_SUITES
from merge_core.errors import BrmergeError, did_you_mean
from search.samplers import MULTI_OBJECTIVE, SAMPLERS

# a search scores items by log-likelihood: not the Leaderboard suite, a generation-only report
SUITES = tuple(s for s in EVAL_SUITES if s != "leaderboard")
DEFAULT_PRUNE_ALPHA = 0.05   # the pruning test's level: a candidate stops on evidence at 5%
DEFAULT_PRUNE_AUDIT = 0.05   # share of would-be prunes scored in full anyway: the audit of the rule
# Ranges a search may set; which of them a method uses is the method's decision.
# What a campaign may search, and in which range, is declared by each merge method on its
# parameters (``merge_core.methods.base.Search``): nothing here names a method or a parameter.

# The commented campaign file `brmerge init` writes (package data, read once).
TEMPLATE = (importlib.resources.files("search") / "campaign_template.yaml").read_text(encoding="utf-8")

DEFAULTS: dict[str, Any] = {
    "method": "ties",                       # deterministic, strong, and mergekit's usual choice
    "search": {"granularity": "layer",      # per-layer coefficients: the point of the search
               "params": {"weight": [0.0, 1.0], "density": [0.1, 1.0]},
               "split_attn_mlp": False},
    "sampler": "tpe",                       # held-out comparison in docs/campaigns.md, "Choosing a sampler"
    "objectives": {"legal": 1.0, "health": 1.0, "enem": 1.0},
    "eval": {"suite": "dev", "limit": 200,  # ~200 items per task: stable enough, cheap enough
             "stage1": None,                # null: a quarter of limit (at least the test's minimum); false: off
             "prune_alpha": DEFAULT_PRUNE_ALPHA, "prune_audit": DEFAULT_PRUNE_AUDIT,
             "chat_template": False,        # as lm-eval: off unless asked; instruct fine-tunes may want it
             "data_dir": None, "allow_test": False, "num_fewshot": 3,
             "dtype": "auto",               # the checkpoint's on a GPU (tensor cores), float32 on CPU
             "max_batch_tokens": 16384},    # rows x (shared prefix + row) tokens per forward: fits small GPUs
    "budget": {"trials": 200, "timeout": None},
    "workers": {"count": "auto", "gpus_per_worker": 1,
                "executor": "ray",          # ray: any number of GPUs and nodes, a dead worker replaced
                "sources": "device",        # device: fastest; host: streamed from pinned host memory; auto: the plan decides
                "magnitude_cache": "auto"}, # auto: 40% of the memory free after the first evaluation; off; or a size
    "ray": {"address": None},
    "storage": None,
    "seed": 0,
}


MAX_WORKERS = 4096        # workers.count: more GPUs than a campaign could use; beyond it, a typo (1e9) that
                          # would ask the executor for that many actors after the study exists
MAX_SEED = 2**32 - 1      # numpy's RandomState, which Optuna's samplers seed, takes 0 .. 2**32 - 1
SOURCES = ("device", "host", "auto")   # workers.sources: where the base and fine-tunes are kept
EXECUTORS = ("ray", "local")   # workers.executor: Ray actors, or threads in the driver (search.protocol)


class CampaignError(BrmergeError):
    """The campaign file is invalid; the message lists every problem, each with its fix."""


@dataclass(frozen=True)
class Campaign:
    name: str
    base_model: str
    models: tuple[str, ...]
    method: str
    granularity: str                        # "layer" | "global" | "block:N"
    params: Mapping[str, tuple[float, float]]  # searched ranges, per-model and shared alike
    split_attn_mlp: bool
    sampler: str
    objectives: Mapping[str, float]
    suite: str
    limit: int | None
    stage1: int | None                      # items per task of stage 1; None: no staging
    data_dir: str | None
    allow_test: bool
    num_fewshot: int
    trials: int
    timeout: float | None
    workers: int | str
    gpus_per_worker: float
    ray_address: str | None
    storage: str | None
    seed: int
    source_file: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    storage_password_env: str | None = None  # storage: {url, password_env}: the password's variable
    prune_alpha: float = DEFAULT_PRUNE_ALPHA
    prune_audit: float = DEFAULT_PRUNE_AUDIT    # eval.prune_audit: share of would-be prunes scored in full
    chat_template: bool = False             # score prompts through the model's chat template
    shared_params: tuple[str, ...] = ()     # the searched parameters set once for the whole merge
    executor: str = "ray"                   # workers.executor: one of EXECUTORS
    dtype: str = "auto"                     # eval.dtype: one of merge_core.dtypes.COMPUTE_DTYPES
    max_batch_tokens: int = DEFAULTS["eval"]["max_batch_tokens"]  # see evals.harness.batch_memory_tokens
    sources: str = "device"                 # workers.sources: one of SOURCES
    magnitude_cache: str = "auto"           # workers.magnitude_cache: auto | off | a size such as 20GB

    @property
    def block_size(self) -> int | None:
        return int(self.granularity.split(":")[1]) if self.granularity.startswith("block:") else None

    @property
    def multi_objective(self) -> bool:
        return self.sampler in MULTI_OBJECTIVE

    def storage_url(self, directory: Path) -> str:
        """The URL as written (no password from the environment: see ``search.storage.resolve``)."""
        from search.storage import default_url   # here: search.storage imports this module

        return self.storage or default_url(directory)


def min_stage1(alpha: float, n_domains: int) -> int:
    """Fewest stage-1 items per task on which the pruning test can fire at all: its items are
    pooled over the scored domains (see ``search.pruning``)."""
    from evals.stats import min_items_for_significance

    return -(-min_items_for_significance(alpha) // n_domains)


def stage1_default(limit: int | None, floor: int) -> int | None:
    """``stage1: null``: a quarter of ``limit``, at least ``floor``; no staging when that would
    not leave a larger full stage, or when every item is scored (``limit: null``)."""
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    size = max(limit // 4, floor)
    return size if size < limit else None


def _merge_defaults(data: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(DEFAULTS)
    for key, value in data.items():
        if isinstance(out.get(key), dict) and isinstance(value, Mapping) and key != "objectives":
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def parse_campaign(data: Any, *, source: str = "campaign") -> Campaign:
    """Validate a campaign mapping; raise ``CampaignError`` listing every problem."""
    from merge_core import methods
    from merge_core.methods.base import Scope

    errors: list[str] = []
    if not isinstance(data, Mapping):
        raise CampaignError(f"{source}: a campaign is a YAML mapping; run `brmerge init` for a template")
    top_keys = ["name", "base_model", "models", *DEFAULTS]
    for key in data:
        if key not in top_keys:
            errors.append(f"unknown key {key!r}{did_you_mean(str(key), top_keys)}")
    for key, allowed in (("search", DEFAULTS["search"]), ("eval", DEFAULTS["eval"]),
                         ("budget", DEFAULTS["budget"]), ("workers", DEFAULTS["workers"]),
                         ("ray", DEFAULTS["ray"])):
        sub = data.get(key)
        if sub is not None and not isinstance(sub, Mapping):
            errors.append(f"{key} must be a mapping like {allowed}")
        elif isinstance(sub, Mapping):
            for k in sub:
                if k not in allowed:
                    errors.append(f"unknown key {key}.{k}{did_you_mean(str(k), list(allowed))}")
    d = _merge_defaults({k: v for k, v in data.items() if not (
        k in ("search", "eval", "budget", "workers", "ray") and not isinstance(v, Mapping))})

    name = d.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", name or ""):
        errors.append(f"name {name!r} must be a simple identifier (letters, digits, - _ .): it names "
                      "the campaign directory")
    base = d.get("base_model")
    if not isinstance(base, str) or not base or base == "path-or-hub-id":
        errors.append("base_model must be the path or hub id of the model the others were fine-tuned from")
    models = d.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        errors.append("models must be a list of at least one fine-tune (paths or hub ids)")
        models = []
    elif any(m == "path-or-hub-id" for m in models):
        errors.append("models still holds the template's placeholders: name your fine-tunes")
    elif len(set(models)) != len(models) or base in models:
        errors.append("models must be distinct and must not repeat base_model")

    method_name = d.get("method")
    per_model_params: list[str] = []
    shared_params: list[str] = []
    declared: dict[str, Any] = {}
    try:
        method = methods.get(str(method_name))
        declared = {p.name: p.search for p in method.params if p.search is not None}
        per_model_params = [p.name for p in method.params
                            if p.search is not None and p.scope in (Scope.MODEL, Scope.INPUT)]
        shared_params = [p.name for p in method.params if p.search is not None and p.scope is Scope.SHARED]
        if method.base.value == "ignored":
            errors.append(f"method {method_name!r} ignores the base model; a campaign merges fine-tunes "
                          "against their base: use ties, dare_ties, della, sce, multislerp, ...")
        elif not per_model_params and not shared_params:
            errors.append(f"method {method_name!r} has no parameter a search can set; "
                          "use ties, dare_ties, della, sce, nearswap, multislerp, ...")
        if isinstance(models, list) and models:   # an empty list has its own error above
            most = method.max_models
            if len(models) < method.min_models or (most is not None and len(models) > most):
                wanted = (f"exactly {most}" if most == method.min_models else
                          f"at least {method.min_models}" if most is None else f"{method.min_models} to {most}")
                errors.append(f"method {method_name} merges {wanted} fine-tune(s) into its base; "
                              f"models has {len(models)}: give {wanted} model(s) or choose another method")
    except BrmergeError as exc:   # an unknown method name (a bug elsewhere keeps its traceback)
        errors.append(f"method: {exc}")
    searchable = per_model_params + shared_params

    search = d["search"]
    gran = str(search.get("granularity"))
    if not (gran in ("layer", "global") or re.fullmatch(r"block:[1-9]\d*", gran)):
        errors.append(f"search.granularity {gran!r} must be layer, global or block:N (N >= 1)")
    params: dict[str, tuple[float, float]] = {}
    raw_params = search.get("params")
    if not isinstance(raw_params, Mapping) or not raw_params:
        errors.append("search.params must map parameter names to [low, high] ranges, e.g. {weight: [0, 1]}")
        raw_params = {}
    for pname, rng in raw_params.items():
        if searchable and pname not in searchable:
            errors.append(f"search.params.{pname}: {method_name} has no searchable parameter {pname!r}"
                          f"{did_you_mean(str(pname), searchable)}; it has {', '.join(searchable)}")
            continue
        if (not isinstance(rng, (list, tuple)) or len(rng) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rng)
                or not rng[0] < rng[1]):
            errors.append(f"search.params.{pname} {rng!r} must be [low, high] with low < high")
            continue
        if not all(math.isfinite(x) for x in rng):
            errors.append(f"search.params.{pname} {list(rng)} must be finite numbers")
            continue
        spec = declared.get(pname)
        if spec is not None and not (spec.low <= rng[0] and rng[1] <= spec.high):
            errors.append(f"search.params.{pname} {list(rng)} must lie within [{spec.low:g}, {spec.high:g}]"
                          if math.isfinite(spec.high) else
                          f"search.params.{pname} {list(rng)} must not go below {spec.low:g}")
            continue
        params[str(pname)] = (float(rng[0]), float(rng[1]))
    for pname in per_model_params:   # the parameter that tells the models apart (their weights)
        if declared[pname].selects_model and pname not in raw_params:
            errors.append(f"search.params must include {pname}: the search needs at least the model {pname}s")
    split = search.get("split_attn_mlp")
    if not isinstance(split, bool):
        errors.append(f"search.split_attn_mlp must be true or false, got {split!r}")

    sampler = d.get("sampler")
    if sampler not in SAMPLERS:
        errors.append(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}{did_you_mean(str(sampler), list(SAMPLERS))}")
    objectives = d.get("objectives")
    if not isinstance(objectives, Mapping) or not objectives:
        errors.append("objectives must map domains to weights, e.g. {legal: 1.0, health: 1.0}")
        objectives = {}
    for dom, w in objectives.items():
        if dom not in DOMAINS:
            errors.append(f"objectives.{dom}: unknown domain{did_you_mean(str(dom), list(DOMAINS))}; "
                          f"choose from {', '.join(DOMAINS)}")
        elif isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            errors.append(f"objectives.{dom} {w!r} must be a weight >= 0")
    if objectives and all(isinstance(w, (int, float)) and w == 0 for w in objectives.values()):
        errors.append("objectives: at least one domain needs a positive weight")

    ev = d["eval"]
    if ev.get("suite") not in SUITES:
        errors.append(f"eval.suite {ev.get('suite')!r} must be sample or dev")
    elif ev.get("suite") == "test" and not ev.get("allow_test"):
        errors.append("eval.suite test: searching on held-out test items makes their scores meaningless; "
                      "use dev, or set eval.allow_test: true if you really mean it")
    limit = ev.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        errors.append(f"eval.limit {limit!r} must be a positive number of items per task, or null for all")
    data_dir = ev.get("data_dir")
    if data_dir is not None and not (isinstance(data_dir, str) and data_dir.strip()):
        errors.append(f"eval.data_dir {data_dir!r} must be a folder path (a string), or null for "
                      "$BRMERGE_DATA_DIR")
    shots = ev.get("num_fewshot")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        errors.append(f"eval.num_fewshot {shots!r} must be a whole number of examples >= 0")
        shots = 0
    address = d["ray"].get("address")
    if address is not None and not (isinstance(address, str) and address.strip()):
        errors.append(f"ray.address {address!r} must be \"auto\", host:port or ray://host:port (a string), "
                      "or null for a private local cluster")
    chat = ev.get("chat_template")
    if not isinstance(chat, bool):
        errors.append(f"eval.chat_template {chat!r} must be true or false")
    alpha = ev.get("prune_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 0.5:
        errors.append(f"eval.prune_alpha {alpha!r} must be a significance level in (0, 0.5], e.g. 0.05")
        alpha = DEFAULT_PRUNE_ALPHA
    audit = ev.get("prune_audit")
    if isinstance(audit, bool) or not isinstance(audit, (int, float)) or not 0 <= audit <= 1:
        errors.append(f"eval.prune_audit {audit!r} must be a share in [0, 1] of would-be-pruned candidates "
                      "scored in full anyway, e.g. 0.05 (0: no audit)")
        audit = DEFAULT_PRUNE_AUDIT
    n_domains = max(1, sum(1 for w in objectives.values() if isinstance(w, (int, float)) and w > 0))
    floor = min_stage1(float(alpha), n_domains)
    stage1 = ev.get("stage1")
    if stage1 is False:
        stage1 = None
    elif stage1 is None:
        stage1 = stage1_default(limit, floor)
    elif isinstance(stage1, bool) or not isinstance(stage1, int) or stage1 < 1:
        errors.append(f"eval.stage1 {stage1!r} must be a number of items per task, null (automatic) or false (off)")
    elif isinstance(limit, int) and stage1 >= limit:
        errors.append(f"eval.stage1 ({stage1}) must be smaller than eval.limit ({limit}), or false")
    elif stage1 < floor:
        errors.append(f"eval.stage1 {stage1}: the pruning test can never fire on fewer than {floor} items per "
                      f"task at prune_alpha {alpha}; give at least {floor}, or false to turn staging off")

    budget = d["budget"]
    trials = budget.get("trials")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        errors.append(f"budget.trials {trials!r} must be a positive integer")
    timeout = budget.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        errors.append(f"budget.timeout {timeout!r} must be seconds > 0, or null")

    workers = d["workers"]
    count = workers.get("count")
    if count != "auto" and (isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_WORKERS):
        errors.append(f"workers.count {count!r} must be auto or an integer from 1 to {MAX_WORKERS}")
    gpw = workers.get("gpus_per_worker")
    if isinstance(gpw, bool) or not isinstance(gpw, (int, float)) or gpw < 0:
        errors.append(f"workers.gpus_per_worker {gpw!r} must be a number >= 0")
    executor = workers.get("executor")
    if executor not in EXECUTORS:
        errors.append(f"workers.executor {executor!r} must be one of {', '.join(EXECUTORS)}")
    sources = workers.get("sources")
    if sources not in SOURCES:
        errors.append(f"workers.sources {sources!r} must be one of {', '.join(SOURCES)}")
    magnitude_cache = workers.get("magnitude_cache")
    if magnitude_cache == 0 or magnitude_cache == "0":
        magnitude_cache = "off"
    if magnitude_cache not in ("auto", "off"):
        from merge_core.io import parse_size

        try:
            parse_size(magnitude_cache)
        except (BrmergeError, TypeError):
            errors.append(f"workers.magnitude_cache {magnitude_cache!r} must be auto, off or a size such as 20GB")
    from merge_core.dtypes import COMPUTE_DTYPES

    dtype = ev.get("dtype")
    if dtype not in COMPUTE_DTYPES:
        errors.append(f"eval.dtype {dtype!r} must be one of {', '.join(COMPUTE_DTYPES)}")
    batch_tokens = ev.get("max_batch_tokens")
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        errors.append(f"eval.max_batch_tokens {batch_tokens!r} must be a positive number of tokens, e.g. 16384")
    seed = d.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        errors.append(f"seed {seed!r} must be an integer from 0 to {MAX_SEED} (2**32 - 1)")
    storage, password_env = d.get("storage"), None
    if isinstance(storage, Mapping):
        extra = sorted(set(storage) - {"url", "password_env"})
        password_env = storage.get("password_env")
        storage = storage.get("url")
        if extra:
            errors.append(f"storage has unknown keys {extra}: give url and, optionally, password_env")
        if password_env is not None and not (isinstance(password_env, str)
                                             and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", password_env)):
            errors.append(f"storage.password_env {password_env!r} must be the name of an environment "
                          "variable, e.g. BRMERGE_DB_PASSWORD")
        elif password_env and isinstance(storage, str) and re.match(r"^[^:/]+://[^/@]*:[^/@]*@", storage):
            errors.append("storage.url has a password and storage.password_env names one too: "
                          "remove the password from the url")
    if storage is not None and not (isinstance(storage, str) and "://" in storage):
        errors.append(f"storage {storage!r} must be an Optuna storage URL (sqlite:///..., "
                      "postgresql+psycopg://...), {url: URL, password_env: VAR}, or null")

    if errors:
        raise CampaignError(f"{source}: " + "; ".join(errors))
    return Campaign(
        name=name, base_model=base, models=tuple(models), method=str(method_name),
        granularity=gran, params=params, shared_params=tuple(p for p in params if p in shared_params),
        split_attn_mlp=bool(split), sampler=str(sampler),
        objectives={k: float(v) for k, v in objectives.items()}, suite=ev["suite"], limit=limit,
        stage1=stage1, prune_alpha=float(alpha), prune_audit=float(audit), chat_template=chat is True, data_dir=ev.get("data_dir"),
        allow_test=bool(ev.get("allow_test")),
        num_fewshot=shots, trials=trials,
        timeout=float(timeout) if timeout else None, workers=count, gpus_per_worker=float(gpw),
        ray_address=d["ray"].get("address"), storage=storage, seed=seed, source_file=source, raw=dict(data),
        storage_password_env=password_env or None, executor=str(executor),
        dtype=str(dtype), max_batch_tokens=batch_tokens, sources=str(sources),
        magnitude_cache=str(magnitude_cache),
    )


def load_campaign(path: str | Path) -> Campaign:
    p = Path(path)
    if not p.is_file():
        raise CampaignError(f"campaign file {str(p)!r} not found: create one with `brmerge init`")
    from merge_core import safe_yaml   # UTF-8 and alias bombs refused as one line

    text = safe_yaml.read_text(p, error=CampaignError, what="campaign file")
    data = safe_yaml.load(text, source=str(p), error=CampaignError)
    return parse_campaign(data, source=str(p))
