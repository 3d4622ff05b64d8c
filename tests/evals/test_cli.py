"""``brmerge eval``: the table, --json with dataset indices, the stock lm-eval command, the
leaderboard suite, and one-line user errors checked before any scoring."""

from __future__ import annotations

import json
import shlex

import pytest

from search.cli import main


def _command(printed: str) -> list[str]:
    line = next(line for line in printed.splitlines() if line.startswith("lm_eval "))
    return shlex.split(line)


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


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
    assert {"acc", "n", "indices"} <= set(data["tasks"]["ptbr_sample_legal_dev"])
    assert len(data["items"]) == 12
    assert set(data["items"][0]) >= {"task", "id", "pred", "gold", "correct"}
    assert data["skipped"]["ptbr_sample_legal_dev"]["fewshot"] == 3
    for name, metrics in data["tasks"].items():
        items = [i for i in data["items"] if i["task"] == name]
        assert metrics["acc"] == sum(i["correct"] for i in items) / len(items)
        assert len(metrics["indices"]) == 3 == len(set(metrics["indices"]))
    args = _command(printed)
    assert json.loads(_flag(args, "--samples")) == {n: t["indices"] for n, t in data["tasks"].items()}
    assert "--apply_chat_template" not in args
    assert data["meta"]["lm_eval_command"] == shlex.join(args)


def test_stock_command_scores_the_same_items(tiny_lm, tiny_zoo, data_dir, tmp_path, capsys):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_zoo["base"]), "--suite", "dev", "--data-dir", str(data_dir),
                 "--tasks", "legal", "--limit", "4", "--device", "cpu", "--json", str(out)]) == 0
    args = _command(capsys.readouterr().out)
    data = json.loads(out.read_text())
    assert _flag(args, "--tasks") == "ptbr_legal_dev"
    # Run what the printed command runs (same tasks, metadata and samples) in-process.
    tm = TaskManager(include_path=_flag(args, "--include_path"), include_defaults=False,
                     metadata=json.loads(_flag(args, "--metadata")))
    model, tok = tiny_lm
    theirs = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=["ptbr_legal_dev"],
        task_manager=tm, samples=json.loads(_flag(args, "--samples")),
        num_fewshot=int(_flag(args, "--num_fewshot")), log_samples=True, verbosity="ERROR")
    ours = {i["id"]: i["pred"] for i in data["items"]}
    stock = theirs["samples"]["ptbr_legal_dev"]
    assert sorted(s["doc"]["id"] for s in stock) == sorted(ours)
    assert theirs["results"]["ptbr_legal_dev"]["acc,none"] == pytest.approx(
        data["tasks"]["ptbr_legal_dev"]["acc"])


def test_eval_gen_mode(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "gen.json"
    code = main(["eval", str(tiny_zoo["base"]), "--suite", "sample", "--tasks", "enem",
                 "--limit", "2", "--gen", "--device", "cpu", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["meta"]["mode"] == "generation" and len(data["items"]) == 4
    assert all(i["pred"] in {"A", "B", "C", "D", "E", "[invalid]"} for i in data["items"])
    printed = capsys.readouterr().out
    assert "-" in printed  # no gold_prob in generation mode
    assert _flag(_command(printed), "--tasks") == "ptbr_sample_enem_dev_gen,ptbr_sample_enem_test_gen"


def test_leaderboard_suite_reports_dev_overlap(tiny_zoo, data_dir, tmp_path, capsys):
    out = tmp_path / "lb.json"
    code = main(["eval", str(tiny_zoo["base"]), "--suite", "leaderboard", "--data-dir",
                 str(data_dir), "--limit", "2", "--no-chat-template", "--device", "cpu",
                 "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == {"ptbr_enem_challenge", "ptbr_oab_exams"}
    assert data["meta"]["mode"] == "generation" and data["meta"]["chat_template"] is False
    enem = data["tasks"]["ptbr_enem_challenge"]
    assert enem["n"] == 2 and enem["dev_overlap"] == 1  # ENEM 2010-2017 of 2010-2018/2022/2023
    assert ("dev overlap: 1 of 2 ptbr_enem_challenge items are also in the dev split; a campaign "
            "searched on dev is optimistic on them") in printed
    assert "chat template: off (--no-chat-template)" in printed
    assert data["meta"]["leaderboard_era"] == "2025" and "normalized" in printed.splitlines()[1]
    assert "not the same item set" in printed
    assert "ptbr_oab_exams: annulled 10, fewshot 3, excluded_by_leaderboard 12" in printed
    args = _command(printed)
    assert _flag(args, "--tasks") == "ptbr_enem_challenge,ptbr_oab_exams"


def test_eval_user_errors_are_one_line(tiny_zoo, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BRMERGE_DATA_DIR", raising=False)
    model = str(tiny_zoo["base"])

    def error(*argv: str) -> str:
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("brmerge eval: error: ")
        return err[len("brmerge eval: error: "):]

    assert error(model, "--suite", "dev") == (
        "--suite dev needs the PT-BR data: pass --data-dir DIR or set BRMERGE_DATA_DIR (or use "
        "--suite sample)")
    assert "does not exist" in error(str(tmp_path / "missing"), "--suite", "sample")
    assert "--limit 0" in error(model, "--limit", "0")
    assert error(model, "--tasks", ",") == (
        "--tasks ',' names no domain; give e.g. --tasks legal,enem (or leave --tasks out for "
        "every domain)")
    assert "unknown domain(s) tax" in error(model, "--tasks", "tax")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "is a file, not a folder" in error(model, "--json", str(blocker / "out.json"))
    assert "is a folder" in error(model, "--json", str(tmp_path))
    assert "has no chat template" in error(model, "--chat-template", "--limit", "1")
    assert "--suite leaderboard needs the PT-BR data" in error(model, "--suite", "leaderboard")
    assert "unknown device" in error(model, "--device", "tpu")
