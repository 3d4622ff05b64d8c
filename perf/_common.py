"""Helpers shared by the perf scripts: synthetic Llama checkpoints and child-process timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_core.io import OutputTensor, ShardedWriter


def llama_shapes(*, hidden: int, layers: int, intermediate: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (hidden, hidden)),
                   (p + "self_attn.k_proj.weight", (hidden, hidden)),
                   (p + "self_attn.v_proj.weight", (hidden, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                   (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def write_synthetic_llama(out: Path, *, seed: int, base: Path | None, hidden: int, layers: int,
                          intermediate: int, vocab: int, dtype: torch.dtype = torch.bfloat16,
                          noise: float = 0.002) -> Path:
    """A Llama checkpoint of random weights (or ``base`` plus seeded noise: a 'fine-tune')."""
    from merge_core.io import TensorReader, weight_files

    shapes = llama_shapes(hidden=hidden, layers=layers, intermediate=intermediate, vocab=vocab)
    g = torch.Generator().manual_seed(seed)
    reader = TensorReader(weight_files(base)) if base is not None else None
    outputs = [OutputTensor(n, s, dtype) for n, s in shapes]
    with ShardedWriter(out, outputs, max_shard_bytes=2 << 30, overwrite=True) as w:
        for name, shape in shapes:
            if reader is not None:
                t = reader.get(name, dtype=torch.float32)
                t.add_(torch.randn(shape, generator=g), alpha=noise)
            elif name.endswith("norm.weight"):
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=g) * 0.02
            w.write(name, t.to(dtype))
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 16,
            "num_key_value_heads": 16, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
            "dtype": str(dtype).replace("torch.", ""),
        }
        w.commit({"config.json": json.dumps(config, indent=2)})
    if reader is not None:
        reader.close()
    return out


@dataclass
class ChildRun:
    seconds: float
    peak_rss_bytes: int
    returncode: int
    output: str


def run_child(cmd: list[str], *, env: dict[str, str] | None = None) -> ChildRun:
    """Run ``cmd``; wall time and the child's own peak RSS (from wait4, not a poll)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    output_chunks = []
    # read output while it runs so a full pipe cannot stall the child
    for line in iter(proc.stdout.readline, b""):
        output_chunks.append(line)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = b"".join(output_chunks).decode(errors="replace")
    return ChildRun(seconds, usage.ru_maxrss * 1024, proc.returncode, text)


def warm_page_cache(folder: Path) -> None:
    # Both tools read from the page cache, not the disk: same start for each.
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def bin_dir() -> Path:
    return Path(sys.executable).parent


def environment() -> dict[str, str]:
    """What a measured figure depends on besides the code: the CPU and the numeric libraries'
    versions (a demo zoo trained elsewhere can differ in its last bits, and so every score)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "optuna", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out
