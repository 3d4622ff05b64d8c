"""Build the small example models that examples/*.yaml merge: a tiny Llama-style base
and two 'fine-tunes' of it (base + seeded noise), with a locally trained tokenizer.

    python -m examples.make_models examples/models

Nothing is downloaded; the models are random and only demonstrate the merge machinery.
"""

from __future__ import annotations

import sys
from pathlib import Path

from search.demo.tiny import llama_config, make_llama, make_tokenizer


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "examples/models")
    if (out / "ft_health" / "config.json").is_file():
        print(f"example models already in {out}")
        return 0
    make_tokenizer(out / "tokenizer")
    cfg = llama_config(hidden=64, layers=4, heads=4)
    base = make_llama(out / "base", seed=0, config=cfg, tokenizer_dir=out / "tokenizer")
    make_llama(out / "ft_legal", seed=1, like=base, tokenizer_dir=out / "tokenizer")
    make_llama(out / "ft_health", seed=2, like=base, tokenizer_dir=out / "tokenizer")
    print(f"wrote base, ft_legal and ft_health to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
