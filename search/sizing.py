"""What one search worker needs: memory by component and seconds per trial, by arithmetic.

Pure functions over plain numbers (no files, no torch): ``search.sizing_inputs`` reads the
configs, safetensors headers, tokenizer and items into a ``ModelShape`` and an ``EvalShape``;
``brmerge plan`` and the search's pre-flight then call ``plan_worker``.

The memory model follows what a worker allocates (``search.worker``):

- sources: the base and every fine-tune, in their checkpoint dtype, on the device
  (``workers.sources: device``) or in pinned host RAM (``host``: the device then holds two
  tensors' worth of inputs, one being merged and one in transfer);
- live model: every parameter once, in the compute dtype (``eval.dtype``);
- magnitude cache: the sorted |fine-tune - base| of each fine-tune, checkpoint dtype (only
  methods that prune by magnitude read it); ``auto`` takes what is left, never more;
- KV: the prefix's cache, plus each row's copy of it and the row's own tokens, for the
  largest batch;
- activations: the largest batch's forward (hidden states, the MLP's intermediate, the
  keys/values repeated per query head, the last position's logits);
- merge scratch: the float32 temporaries of merging the largest tensor;
- runtime: the CUDA context and cuBLAS workspace (GPU) or the interpreter with torch and
  transformers loaded (CPU).

The time model: a merge moves bytes (bandwidth bound), an evaluation does FLOPs (compute
bound); each at an efficiency below the card's peak (``EFFICIENCY``), plus a fixed cost per
tensor merged and per forward. ``--calibrate`` replaces both rates with the local device's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# name -> (memory GiB as the driver reports it, dense bf16/fp16 TFLOP/s, fp32 TFLOP/s without
# tensor cores (torch leaves TF32 off for matmuls), memory bandwidth TB/s). Vendor data sheets.
GPUS: dict[str, tuple[float, float, float, float]] = {
    "H100-80GB": (79.6, 989.0, 67.0, 3.35),
    "H200-141GB": (140.4, 989.0, 67.0, 4.8),
    "A100-40GB": (39.5, 312.0, 19.5, 1.55),
    "L40S-48GB": (45.0, 362.0, 91.6, 0.86),
    "L4-24GB": (22.5, 121.0, 30.3, 0.30),
}
CPU = "cpu"
# Share of a card kept free for what the plan does not model (the caching allocator's
# fragmentation and rounding, transient buffers of attention and the merge): a plan that needs
# more than the rest does not fit. Not yet measured on a GPU (perf/gpu_campaign.py does): at 5%
# a float32 Mistral-7B worker planned within 1 GiB of an H100's limit "fit", where an OOM in the
# first trial costs more than a refusal that names the fix.
HEADROOM = 0.10
CUDA_CONTEXT = 0.75 * GIB  # context + cuBLAS workspace of one process, as nvidia-smi shows it
CPU_RUNTIME = 0.55 * GIB   # interpreter + torch + transformers + numba, resident (measured)
# Share of the peak FLOP/s and bandwidth that a forward / a merge reaches (rough, documented;
# --calibrate measures the real rates).
EFFICIENCY = {"flops": 0.40, "bandwidth": 0.50}
# CPU defaults when not calibrated: per-core float32 GFLOP/s and host bandwidth GB/s.
CPU_GFLOPS_PER_CORE = 40.0
CPU_BANDWIDTH_GBS = 10.0
PER_TENSOR_S = {"gpu": 2e-4, "cpu": 1e-4}    # Python + launches per merged tensor
PER_FORWARD_S = {"gpu": 0.015, "cpu": 0.002}  # Python + launches per forward pass
PER_TRIAL_S = 0.2                              # ask/tell and storage round trip per trial
# The plan of each new recipe (headers re-read, checks, per-tensor parameters): seconds per
# tensor and model, CPU-bound on any machine (measured 2.5-5 ms on a 2-core VM).
PREPARE_S = 4e-3
# Float32 copies of the largest tensor a merge holds at once beyond its inputs and output:
# the torch path of the task-arithmetic family chunks its temporaries, but finds the
# magnitude cut-off on the whole |delta| (without the cache); linear sums into a float32
# tensor; the other methods stack every input in float32.
SCRATCH_COPIES = {"linear": 2.0, "task_arithmetic": 1.0, "ties": 2.0, "dare_ties": 1.0,
                  "dare_linear": 1.0, "breadcrumbs": 2.0, "breadcrumbs_ties": 2.0,
                  "della": 2.0, "della_linear": 2.0}
MAGNITUDE_METHODS = frozenset({"ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"})
ACT_HIDDEN_COPIES = 4.0   # residual, normed input, attention output, projection output
ACT_MLP_COPIES = 3.0      # gate, up, act(gate) * up


@dataclass(frozen=True)
class ModelShape:
    params: int               # every parameter the checkpoint holds (tied embeddings once)
    embed_params: int         # the input embedding (no FLOPs in a forward)
    head_params: int          # an untied output head (vocab x hidden); 0 when tied to the embedding
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    largest_tensor: int       # elements of the largest tensor
    n_tensors: int
    checkpoint_dtype: str     # "bfloat16", ...

    @property
    def block_params(self) -> int:
        return self.params - self.embed_params - self.head_params

    def kv_bytes_per_token(self, dtype: str) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class EvalShape:
    """The forwards of one evaluation: per task its shared prefix's length and its batches."""

    prefixes: tuple[int, ...]                              # shared-prefix tokens per task (0: none)
    batches: tuple[tuple[int, int, int], ...]              # (rows, prefix tokens, padded row tokens)
    items: int = 0

    def largest(self) -> tuple[int, int, int]:
        """The batch with the most KV (rows x (prefix + row)); the memory peak."""
        return max(self.batches, key=lambda b: (b[0] * (b[1] + b[2]), b[0] * b[2]), default=(0, 0, 0))


@dataclass(frozen=True)
class Rates:
    """Device speed: FLOP/s of a forward in each dtype, bytes/s of a merge (effective)."""

    flops: dict[str, float]
    bandwidth: float
    kind: str                 # "gpu" | "cpu"
    calibrated: bool = False
    prepare_s: float = PREPARE_S   # a new recipe's plan, per tensor and model


@dataclass(frozen=True)
class Setting:
    dtype: str                # compute dtype of the live model and KV
    sources: str              # "device" | "host"
    cache: str | int          # "auto" | "off" | bytes
    max_batch_tokens: int | None = None   # None: as the evaluator batches now


@dataclass
class WorkerPlan:
    device: str
    capacity: int                                     # bytes usable (after headroom)
    memory: dict[str, int]                            # component -> bytes on the device
    host: int                                         # host RAM the worker needs (bytes)
    setting: Setting
    seconds: dict[str, float] = field(default_factory=dict)   # merge / eval / overhead
    fix: str | None = None
    fix_host: int | None = None

    @property
    def total(self) -> int:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def trial_seconds(self) -> float:
        return sum(self.seconds.values())


def device_capacity(gpu: str, *, memory_gib: float | None = None, host_bytes: int | None = None) -> int:
    """Bytes a worker may use on ``gpu`` (``--gpu-memory`` overrides the table)."""
    if gpu == CPU:
        return int(host_bytes or 0) if memory_gib is None else int(memory_gib * GIB)
    total = memory_gib if memory_gib is not None else GPUS[gpu][0]
    return int(total * GIB * (1 - HEADROOM))


def default_rates(gpu: str, *, cores: int = 1) -> Rates:
    if gpu == CPU:
        f = CPU_GFLOPS_PER_CORE * 1e9 * cores
        # bf16/fp16 matmuls on CPU without AMX run slower than float32
        return Rates(flops={"float32": f, "bfloat16": f / 2, "float16": f / 4},
                     bandwidth=CPU_BANDWIDTH_GBS * 1e9, kind="cpu")
    _, half, single, bw = GPUS[gpu]
    e = EFFICIENCY["flops"]
    return Rates(flops={"float32": single * 1e12 * e, "bfloat16": half * 1e12 * e,
                        "float16": half * 1e12 * e},
                 bandwidth=bw * 1e12 * EFFICIENCY["bandwidth"], kind="gpu")


def _cache_full(model: ModelShape, n_models: int, method: str) -> int:
    if method not in MAGNITUDE_METHODS:
        return 0
    return n_models * model.params * DTYPE_BYTES[model.checkpoint_dtype]


def batch_memory(model: ModelShape, rows: int, prefix: int, row: int, longest_prefix: int,
                 dtype: str) -> tuple[int, int]:
    """(KV bytes, activation bytes) of one forward of ``rows`` x ``row`` tokens on a prefix."""
    c = DTYPE_BYTES[dtype]
    # the task's prefix cache + each row's copy of it and its own tokens
    kv = model.kv_bytes_per_token(dtype) * (longest_prefix + rows * (prefix + row))
    tokens, span = rows * row, prefix + row
    acts = tokens * (ACT_HIDDEN_COPIES * model.hidden + ACT_MLP_COPIES * model.intermediate) * c
    acts += 2 * rows * model.heads * span * model.head_dim * c      # keys/values repeated per query head
    acts += rows * row * span                                         # the 4-D attention mask (bool)
    acts += rows * model.vocab * (c + 4 + 4)                          # last-position logits, float, log-softmax
    return int(kv), int(acts)


def eval_memory(model: ModelShape, ev: EvalShape, dtype: str) -> tuple[int, int]:
    """(KV bytes, activation bytes) of the evaluation's most demanding forward."""
    longest_prefix = max(ev.prefixes, default=0)
    forwards = [*((1, 0, p) for p in ev.prefixes if p), *ev.batches]
    return max((batch_memory(model, *b, longest_prefix, dtype) for b in forwards), key=sum, default=(0, 0))


def memory(model: ModelShape, n_models: int, method: str, ev: EvalShape, s: Setting,
           *, gpu: bool, capacity: int) -> tuple[dict[str, int], int]:
    """(device bytes by component, host bytes) of one worker."""
    ck = DTYPE_BYTES[model.checkpoint_dtype]
    sources_bytes = (1 + n_models) * model.params * ck
    if s.sources == "host":
        # one tensor being merged and the next in transfer, every input of each
        on_device = 2 * (1 + n_models) * model.largest_tensor * ck
    else:
        on_device = sources_bytes
    kv, acts = eval_memory(model, ev, s.dtype)
    scratch = int(SCRATCH_COPIES.get(method, 2.0 + n_models) * model.largest_tensor * 4)
    out = {"sources": int(on_device), "live model": model.params * DTYPE_BYTES[s.dtype],
           "magnitude cache": 0, "KV": kv, "activations": acts, "merge scratch": scratch,
           "runtime": int(CUDA_CONTEXT if gpu else CPU_RUNTIME)}
    full_cache = _cache_full(model, n_models, method)
    if s.cache == "auto":
        out["magnitude cache"] = max(0, min(full_cache, capacity - sum(out.values())))
    elif s.cache != "off":
        out["magnitude cache"] = min(full_cache, int(s.cache))
    # host RAM: on CPU everything the worker holds; on a GPU the interpreter and host sources
    host = sum(out.values()) if not gpu else int(CPU_RUNTIME) + (sources_bytes if s.sources == "host" else 0)
    return out, host


def seconds(model: ModelShape, n_models: int, ev: EvalShape, s: Setting, rates: Rates) -> dict[str, float]:
    """Predicted seconds of one trial that is not pruned: merge (with its recipe's plan, as
    the worker reports ``materialize_seconds``), evaluation, overhead."""
    ck, c = DTYPE_BYTES[model.checkpoint_dtype], DTYPE_BYTES[s.dtype]
    # bytes a merge moves per parameter: every input read, float32 work read and written per
    # fine-tune, the live model written
    moved = model.params * ((1 + n_models) * ck + 8 * n_models + c)
    merge = moved / rates.bandwidth + model.n_tensors * (1 + n_models) * rates.prepare_s
    if s.sources == "host" and rates.kind == "gpu":
        merge = max(merge, (1 + n_models) * model.params * ck / 25e9)   # PCIe 4/5 x16, pinned
    flops = eval_flops(model, ev)
    evaluation = flops / rates.flops.get(s.dtype, rates.flops["float32"])
    forwards = len(ev.batches) + sum(1 for p in ev.prefixes if p)
    overhead = (PER_TRIAL_S + model.n_tensors * PER_TENSOR_S[rates.kind]
                + forwards * PER_FORWARD_S[rates.kind])
    return {"merge": merge, "eval": evaluation, "overhead": overhead}


def forward_flops(model: ModelShape, rows: int, prefix: int, row: int, *, head: bool = True) -> float:
    """FLOPs of one forward of ``rows`` x ``row`` new tokens over a ``prefix`` already cached."""
    tokens = rows * row
    dense = 2 * model.block_params * tokens
    # scores and weighted sum: each new token attends to prefix + (on average) half its row
    attn = 4 * model.layers * model.heads * model.head_dim * tokens * (prefix + row)
    logits = 2 * model.vocab * model.hidden * rows if head else 0
    return float(dense + attn + logits)


def eval_flops(model: ModelShape, ev: EvalShape) -> float:
    total = sum(forward_flops(model, 1, 0, p) for p in ev.prefixes if p)
    return total + sum(forward_flops(model, *b) for b in ev.batches)


def plan_worker(model: ModelShape, n_models: int, method: str, ev: EvalShape, s: Setting, *,
                gpu: str, rates: Rates, memory_gib: float | None = None,
                host_bytes: int | None = None) -> WorkerPlan:
    """The plan of one worker with setting ``s``; ``fix`` names the cheapest change that fits
    when it does not (see ``cheapest_fix``)."""
    capacity = device_capacity(gpu, memory_gib=memory_gib, host_bytes=host_bytes)
    mem, host = memory(model, n_models, method, ev, s, gpu=gpu != CPU, capacity=capacity)
    plan = WorkerPlan(device=gpu, capacity=capacity, memory=mem, host=host, setting=s,
                      seconds=seconds(model, n_models, ev, s, rates))
    if not plan.fits:
        found = cheapest_fix(model, n_models, method, ev, s, gpu=gpu, capacity=capacity)
        if found is not None:
            plan.fix, fixed = found
            plan.fix_host = fixed.host
    return plan


def shrink_batches(ev: EvalShape, limit: int) -> EvalShape:
    """``ev`` with every batch cut to at most ``limit`` tokens (rows x (prefix + row))."""
    out = []
    for rows, prefix, row in ev.batches:
        fit = max(1, limit // max(1, prefix + row))
        while rows > 0:
            out.append((min(rows, fit), prefix, row))
            rows -= fit
    return replace(ev, batches=tuple(out))


def cheapest_fix(model: ModelShape, n_models: int, method: str, ev: EvalShape, s: Setting, *,
                 gpu: str, capacity: int) -> tuple[str, WorkerPlan] | None:
    """The first change, cheapest first, that makes the worker fit: the magnitude cache off
    (a slower merge), a half-precision compute dtype (on a GPU, also faster), sources in host
    RAM (a PCIe transfer per merge), then smaller batches; each is tried on top of the
    earlier ones. None when even all of them do not fit."""
    is_gpu = gpu != CPU
    steps: list[tuple[str, Setting, EvalShape]] = []
    cur, cur_ev = s, ev
    if s.cache not in ("auto", "off") and method in MAGNITUDE_METHODS:
        cur = replace(cur, cache="off")
        steps.append(("workers.magnitude_cache: off", cur, cur_ev))
    if s.dtype == "float32" and is_gpu:
        cur = replace(cur, dtype="bfloat16")
        steps.append(("eval.dtype: bfloat16", cur, cur_ev))
    if s.sources == "device" and is_gpu:
        cur = replace(cur, sources="host")
        steps.append(("workers.sources: host", cur, cur_ev))
    rows, prefix, row = ev.largest()
    tokens = rows * (prefix + row)
    while tokens > 512:
        tokens //= 2
        cur_ev = shrink_batches(ev, tokens)
        steps.append((f"eval.max_batch_tokens: {tokens}", cur, cur_ev))
    done: list[str] = []
    for name, setting, shape in steps:
        if not name.startswith("eval.max_batch_tokens") or not done or not done[-1].startswith("eval.max"):
            done.append(name)
        else:
            done[-1] = name
        mem, host = memory(model, n_models, method, shape, setting, gpu=is_gpu, capacity=capacity)
        if sum(mem.values()) <= capacity:
            plan = WorkerPlan(device=gpu, capacity=capacity, memory=mem, host=host, setting=setting)
            return ", ".join(done), plan
    return None
