"""The "Sizing a campaign" table of docs/campaigns.md, from public model configs only.

For each model: folders holding only its public ``config.json`` (architecture numbers as the
model's own config publishes them) and Mistral's SentencePiece tokenizer from
``mistral-common`` (so every row tokenizes the items alike), a base and two fine-tunes, TIES,
the dev suite at ``limit: 200`` with three shots, ``eval.dtype: auto`` (bfloat16 checkpoints)
and ``workers.sources: device``; each GPU kind is planned with ``search.sizing_report``, the
code behind ``brmerge plan``. A cell is the plan's total without the magnitude cache (which
takes what is left) and trials per hour for one worker, or the cheapest fix.

    python perf/sizing_table.py [--data-dir ../shared/data/ptbr]

No weights are made or loaded; it takes about a minute (tokenizing the items once per model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

GPUS = ("L4-24GB", "A100-40GB", "L40S-48GB", "H100-80GB", "H200-141GB")
_COMMON = {"hidden_act": "silu", "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "bos_token_id": 1,
           "eos_token_id": 2, "max_position_embeddings": 32768}
# name -> the architecture numbers of the model's public config.json
MODELS: dict[str, dict] = {
    "Llama-3.2-1B": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
                     "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "tie_word_embeddings": True},
    "Llama-3.2-3B": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
                     "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
                     "tie_word_embeddings": True},
    "Mistral-7B-v0.1": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
                        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "sliding_window": 4096,
                        "tie_word_embeddings": False},
    "Llama-3.1-8B": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
                     "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "Qwen2.5-14B": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
                    "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
                    "num_attention_heads": 40, "num_key_value_heads": 8, "tie_word_embeddings": False},
}


def _folders(root: Path, config: dict) -> list[Path]:
    import mistral_common
    from transformers import LlamaTokenizer

    (root / "tok").mkdir(parents=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", root / "tok" / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(root / "tok"), add_bos_token=True)
    out = []
    for name in ("base", "ft1", "ft2"):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({**_COMMON, **config}))
        tok.save_pretrained(str(root / name))
        out.append(root / name)
    return out


def _cell(plan: dict) -> str:
    gib = 2 ** 30
    if plan["fits"]:
        used = plan["total_bytes"] - plan["memory_bytes"].get("magnitude cache", 0)
        return f"fits: {used / gib:.0f} GiB, {plan['trials_per_hour']:.0f}/h"
    if plan["fix"]:
        return f"{plan['fix']} (host RAM {(plan['fix_host_bytes'] or 0) / gib:.0f} GiB)"
    return "does not fit"


def main(argv: list[str] | None = None) -> int:
    from search.campaign import parse_campaign
    from search.sizing_report import plan_campaign

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ptbr"))
    args = ap.parse_args(argv)
    print("| model (2 fine-tunes, TIES) | params | " + " | ".join(GPUS) + " |")
    print("|---|---|" + "---|" * len(GPUS))
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in MODELS.items():
            base, ft1, ft2 = _folders(Path(tmp) / name, config)
            campaign = parse_campaign({
                "name": "sizing", "base_model": str(base), "models": [str(ft1), str(ft2)], "method": "ties",
                "eval": {"suite": "dev", "limit": 200, "num_fewshot": 3, "data_dir": args.data_dir},
                "workers": {"gpus_per_worker": 1, "sources": "device"}}, source="perf/sizing_table.py")
            cells, params = [], 0.0
            for gpu in GPUS:
                plan = plan_campaign(campaign, gpu=gpu).as_dict()
                params = plan["params"] / 1e9
                cells.append(_cell(plan))
            print(f"| {name} | {params:.2f}B | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
