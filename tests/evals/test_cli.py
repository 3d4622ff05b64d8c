"""``brmerge eval``: the table, --json, and one-line user errors."""

from __future__ import annotations

import json

from search.cli import main


def test_eval_prints_table_and_writes_json(tiny_zoo, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BRMERGE_DATA_DIR", raising=False)
    out = tmp_path / "res" / "eval.json"
    code = main(["eval", str(tiny_zoo["base"]), "--suite", "sample", "--tasks", "legal,health",
                 "--limit", "3", "--device", "cpu", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    header = printed.splitlines()[0].split()
    assert header == ["task", "domain", "items", "accuracy", "gold_prob", "chance"]
    row = next(line for line in printed.splitlines() if line.startswith("ptbr_sample_legal_test"))
    assert row.split()[1:3] == ["legal", "3"] and row.split()[-1] == "0.250"
    assert "ptbr_sample_health_dev: fewshot 3" in printed
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == {"ptbr_sample_legal_dev", "ptbr_sample_legal_test",
                                  "ptbr_sample_health_dev", "ptbr_sample_health_test"}
    assert {"acc", "n"} <= set(data["tasks"]["ptbr_sample_legal_dev"])
    assert len(data["items"]) == 12
    assert set(data["items"][0]) >= {"task", "id", "pred", "gold", "correct"}
    assert data["skipped"]["ptbr_sample_legal_dev"]["fewshot"] == 3
    for name, metrics in data["tasks"].items():
        items = [i for i in data["items"] if i["task"] == name]
        assert metrics["acc"] == sum(i["correct"] for i in items) / len(items)


def test_eval_gen_mode(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "gen.json"
    code = main(["eval", str(tiny_zoo["base"]), "--suite", "sample", "--tasks", "enem",
                 "--limit", "2", "--gen", "--device", "cpu", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["meta"]["mode"] == "generation" and len(data["items"]) == 4
    assert all(i["pred"] in {"A", "B", "C", "D", "E", "[invalid]"} for i in data["items"])
    assert "-" in capsys.readouterr().out  # no gold_prob in generation mode


def test_eval_user_errors_are_one_line(tiny_zoo, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BRMERGE_DATA_DIR", raising=False)
    assert main(["eval", str(tiny_zoo["base"]), "--suite", "dev"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("brmerge eval: error: --suite dev needs the PT-BR data: pass --data-dir DIR "
                   "or set BRMERGE_DATA_DIR (or use --suite sample)")
    assert main(["eval", str(tmp_path / "missing"), "--suite", "sample"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(tiny_zoo["base"]), "--limit", "0"]) == 2
    assert "--limit 0" in capsys.readouterr().err
