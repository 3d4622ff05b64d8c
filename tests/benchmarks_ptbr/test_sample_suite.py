"""The shipped sample suite: size, keys, ids, splits, source notes."""

from __future__ import annotations

import json

import pytest

from benchmarks_ptbr.sources import SAMPLE_DIR, SAMPLE_DOMAINS, load_sample

TOPICS = {"legal": {"Constituição", "CLT", "Código Civil"},
          "health": {"SUS", "dengue", "vacinação"},
          "enem": {"leitura", "ciências", "humanidades"}}


@pytest.mark.parametrize("domain", SAMPLE_DOMAINS)
def test_sample_domain_is_complete_and_valid(domain):
    rows = [json.loads(line) for line in (SAMPLE_DIR / f"{domain}.jsonl").read_text().splitlines()]
    assert len(rows) >= 30
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        labels = [c["label"] for c in r["choices"]]
        assert len(labels) in (4, 5) and labels == list("ABCDE"[: len(labels)])
        assert r["answerKey"] in labels
        assert r["source_note"].strip() and r["question"].strip()
        assert all(c["text"].strip() for c in r["choices"])
    assert {r["topic"] for r in rows} == TOPICS[domain]
    loaded = load_sample(domain)
    assert len(loaded.items["dev"]) >= 15 and len(loaded.items["test"]) >= 15
    # every topic appears in both splits
    for split in ("dev", "test"):
        assert {i.exam for i in loaded.items[split]} == TOPICS[domain]
    # keys are not all the same letter
    assert len({r["answerKey"] for r in rows}) >= 4
