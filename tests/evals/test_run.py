"""``evals.run``: option checks and the stock lm-eval command, without loading a model."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from benchmarks_ptbr.tasks.ptbr_utils import load_task
from evals.harness import EvalError
from evals.run import EvalOptions, check_json_path, load_suites, parse_domains, stock_command, write_json


def test_parse_domains():
    assert parse_domains(None) is None
    assert parse_domains(" legal, enem ,") == ["legal", "enem"]
    for empty in (",", "", " , "):
        with pytest.raises(EvalError, match="names no domain"):
            parse_domains(empty)


def test_check_json_path(tmp_path):
    assert check_json_path(None) is None
    out = check_json_path(str(tmp_path / "new" / "deeper" / "eval.json"))
    assert not (tmp_path / "new").exists()   # nothing made before the scores exist
    write_json(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1} and sorted(p.name for p in out.parent.iterdir()) == ["eval.json"]
    with pytest.raises(EvalError, match="is a folder"):
        check_json_path(str(tmp_path))
    (tmp_path / "f").write_text("x")
    with pytest.raises(EvalError, match="is a file, not a folder"):
        check_json_path(str(tmp_path / "f" / "a" / "eval.json"))


def test_stock_command_indices_follow_the_shots(data_dir):
    # With --num-fewshot 1 the dev task has other items than with 3 (only one shot is
    # removed), so the command passes num_fewshot to the task loader as metadata too.
    options = EvalOptions(model="/m", suite="dev", tasks="legal", limit=5, data_dir=str(data_dir),
                          num_fewshot=1)
    suites = load_suites(options)
    args = shlex.split(stock_command(options, suites))
    metadata = json.loads(args[args.index("--metadata") + 1])
    assert metadata == {"data_dir": str(Path(data_dir).resolve()), "num_fewshot": 1}   # the resolved folder
    assert args[args.index("--num_fewshot") + 1] == "1"
    samples = json.loads(args[args.index("--samples") + 1])
    docs = load_task(domain="legal", split="dev", source="data", **metadata)["test"]
    assert [docs[i]["id"] for i in samples["ptbr_legal_dev"]] == [
        i.id for i in suites[0].task("ptbr_legal_dev").items]


def test_stock_command_without_limit_scores_everything_and_hub_has_none():
    options = EvalOptions(model="org/name", suite="sample", tasks="enem", gen=True,
                          chat_template=True, trust_remote_code=True)
    args = shlex.split(stock_command(options, load_suites(options)))
    assert "--samples" not in args and "--metadata" not in args
    assert args[args.index("--tasks") + 1] == "ptbr_sample_enem_dev_gen,ptbr_sample_enem_test_gen"
    assert args[args.index("--model_args") + 1] == "pretrained=org/name,trust_remote_code=True"
    assert args[-2:] == ["--apply_chat_template", "--fewshot_as_multiturn"]
    hub = EvalOptions(model="m", hub=True)
    assert stock_command(hub, [type("S", (), {"source": "hub"})()]) is None
