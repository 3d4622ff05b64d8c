"""The demo and everything it builds locally.

- ``run``: ``brmerge demo`` end to end (zoo, campaign, table, report, export, summary);
- ``zoo``: the demo's trained tiny base and specialists, cached;
- ``facts``: the demo's own items (synthetic facts asked in dev and, in other words, test phrasings);
- ``table``: the demo's rows and its claim, decided on the held-out test items;
- ``tiny``: tiny Llama-style models and a byte-level BPE tokenizer, built with no network
  (tests, ``perf/`` and ``examples/`` build their models with these too);
- ``corpus.json``: Portuguese prose written for this project, the zoo's training text.
"""
