"""``brmerge plan`` and the search's memory pre-flight, from configs and a tokenizer only.

Mistral-7B-v0.1's public config (folders holding only config.json and Mistral's real
SentencePiece tokenizer from mistral-common) with two fine-tunes under TIES: fits an 80 GB
H100 in bfloat16 with the sources on the device, not a 24 GB card that way, and a 24 GB card
with ``workers.sources: host``; float32 on the H100 is refused by the pre-flight, naming the fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from search.campaign import parse_campaign
from search.cli import main
from search.sizing import GIB
from search.sizing_inputs import GPU_ENV, shape_from_config

MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
              "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
              "sliding_window": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
              "eos_token_id": 2, "hidden_act": "silu"}


@pytest.fixture(scope="module")
def mistral_7b(tmp_path_factory) -> dict[str, Path]:
    """Base and two fine-tunes of Mistral-7B-v0.1: config.json and the tokenizer, no weights."""
    mistral_common = pytest.importorskip("mistral_common")
    from transformers import LlamaTokenizer

    root = tmp_path_factory.mktemp("mistral7b")
    (root / "tok").mkdir()
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1",
                root / "tok" / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(root / "tok"), add_bos_token=True)
    folders = {}
    for name in ("base", "ft1", "ft2"):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(MISTRAL_7B))
        tok.save_pretrained(str(root / name))
        folders[name] = root / name
    return folders


def _campaign_file(tmp_path: Path, folders: dict[str, Path], data_dir: Path, *,
                   ev: dict | None = None, workers: dict | None = None) -> Path:
    data = {"name": "m7", "base_model": str(folders["base"]),
            "models": [str(folders["ft1"]), str(folders["ft2"])], "method": "ties",
            "eval": {"suite": "dev", "limit": 50, "data_dir": str(data_dir), **(ev or {})},
            "workers": {"gpus_per_worker": 1, **(workers or {})}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _plan(capsys, path: Path, gpu: str) -> dict:
    assert main(["plan", str(path), "--gpu", gpu, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_parameter_count_from_config_matches_transformers(family):
    import transformers as tf

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=family == "qwen2")
    config = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family](**common)
    model = tf.AutoModelForCausalLM.from_config(config)
    expected = sum(p.numel() for p in model.parameters())   # tied weights counted once
    shape = shape_from_config(config.to_dict())
    assert shape.params == expected
    assert shape.n_tensors == len(model.state_dict()) - (1 if config.tie_word_embeddings else 0)


def test_mistral_7b_bf16_fits_an_h100_with_sources_on_the_device(mistral_7b, data_dir, tmp_path, capsys):
    plan = _plan(capsys, _campaign_file(tmp_path, mistral_7b, data_dir), "H100-80GB")
    assert plan["params"] == 7_241_732_096          # Mistral-7B-v0.1's published count
    assert plan["setting"]["dtype"] == "bfloat16" and plan["setting"]["sources"] == "device"
    assert plan["fits"] and plan["total_bytes"] <= plan["capacity_bytes"]
    assert plan["memory_bytes"]["sources"] == 3 * 7_241_732_096 * 2
    assert all(v > 0 for v in plan["seconds"].values()) and plan["trials_per_hour"] > 0


def test_mistral_7b_does_not_fit_24gb_with_sources_on_the_device(mistral_7b, data_dir, tmp_path, capsys):
    plan = _plan(capsys, _campaign_file(tmp_path, mistral_7b, data_dir), "L4-24GB")
    assert not plan["fits"]
    assert plan["fix"].startswith("workers.sources: host")
    assert plan["fix_host_bytes"] > 3 * 7_241_732_096 * 2      # the sources move to host RAM


def test_mistral_7b_fits_24gb_with_sources_in_host_ram(mistral_7b, data_dir, tmp_path, capsys):
    plan = _plan(capsys, _campaign_file(tmp_path, mistral_7b, data_dir, workers={"sources": "host"}), "L4-24GB")
    assert plan["setting"]["sources"] == "host"
    assert plan["fits"], plan
    assert plan["memory_bytes"]["sources"] < 2 * GIB
    assert plan["host_bytes"] >= 3 * 7_241_732_096 * 2


def test_float32_on_an_h100_is_refused_by_the_search_preflight(mistral_7b, data_dir, tmp_path, capsys,
                                                               monkeypatch):
    # float32 at the default batch budget: ~75 GiB planned against 72 GiB usable (bfloat16: 59 GiB)
    path = _campaign_file(tmp_path, mistral_7b, data_dir, ev={"dtype": "float32"})
    monkeypatch.setenv(GPU_ENV, "H100-80GB")
    directory = tmp_path / "run"
    assert main(["search", str(path), "--dir", str(directory)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "H100-80GB" in err and "set eval.dtype: bfloat16" in err and "host RAM" in err
    assert not (directory / "study.db").exists() and not (directory / "campaign.yaml").exists()


def test_the_preflight_passes_a_tiny_cpu_campaign(tiny_zoo, tmp_path):
    from search.sizing_report import preflight

    campaign = parse_campaign({"name": "t", "base_model": str(tiny_zoo["base"]),
                               "models": [str(tiny_zoo["ft_a"])], "eval": {"suite": "sample"},
                               "workers": {"gpus_per_worker": 0}})
    line = preflight(campaign)
    assert line.startswith("plan: a worker needs") and "cpu" in line


def test_calibrate_times_the_local_device_and_predicts_from_it(tiny_zoo, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base_model": str(tiny_zoo["base"]),
                                    "models": [str(tiny_zoo["ft_a"]), str(tiny_zoo["ft_b"])],
                                    "eval": {"suite": "sample", "limit": 2},
                                    "workers": {"gpus_per_worker": 0}}))
    plain = _plan(capsys, path, "cpu")
    assert main(["plan", str(path), "--gpu", "cpu", "--calibrate", "--json"]) == 0
    calibrated = json.loads(capsys.readouterr().out)
    assert not plain["calibrated"] and calibrated["calibrated"]
    assert calibrated["fits"] and calibrated["memory_bytes"] == plain["memory_bytes"]
    assert calibrated["seconds"] != plain["seconds"] and all(v > 0 for v in calibrated["seconds"].values())


def test_gpu_campaign_script_runs_its_small_mode_on_cpu(capsys):
    pytest.importorskip("psutil")
    from perf import gpu_campaign

    assert gpu_campaign.main(["--small", "--trials", "1", "--limit", "1", "--dtypes", "float32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    run = report["runs"][0]
    assert report["device"] == "cpu" and run["trials"] == 1
    assert run["measured_peak"] > 0 and run["planned_bytes"] > 0 and run["eval_s"] > 0

