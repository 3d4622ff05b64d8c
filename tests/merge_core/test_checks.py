"""Compatibility checks: each kind of mismatch gets one line naming the model and the tensor."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from merge_core.checks import (
    IncompatibleModelsError,
    TensorInfo,
    check_compatible,
    read_tensor_infos,
)
from merge_core.sources import resolve_model
from search.demo.tiny import llama_config, make_llama, make_tokenizer

EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def odd_zoo(tiny_zoo, tmp_path_factory) -> dict[str, Path]:
    """Models that are NOT compatible with tiny_zoo's base, one difference each."""
    root = tmp_path_factory.mktemp("odd")
    tok = tiny_zoo["tokenizer"]
    zoo = {
        "wide": make_llama(root / "wide", seed=7, config=llama_config(hidden=48),
                           tokenizer_dir=tok),
        "shallow": make_llama(root / "shallow", seed=8, config=llama_config(layers=2),
                              tokenizer_dir=tok),
        "big_vocab": make_llama(root / "big_vocab", seed=9,
                                config=llama_config(vocab_size=400), tokenizer_dir=tok),
        "bf16": make_llama(root / "bf16", seed=10, like=tiny_zoo["base"], dtype=torch.bfloat16,
                           tokenizer_dir=tok),
    }
    # Same weights as ft_a, but a tokenizer trained on another corpus (same vocabulary size).
    other_tok = shutil.copytree(tiny_zoo["ft_a"], root / "other_tok")
    make_tokenizer(other_tok, corpus=[f"texto diferente número {i} sobre outra coisa"
                                      for i in range(50)])
    zoo["other_tok"] = other_tok
    # Same shapes, other architecture (a hand-edited config).
    mistral = shutil.copytree(tiny_zoo["ft_a"], root / "mistral")
    config = json.loads((mistral / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (mistral / "config.json").write_text(json.dumps(config))
    zoo["mistral"] = mistral
    # 400 embedding rows but a config that claims 384.
    lying = shutil.copytree(zoo["big_vocab"], root / "lying")
    config = json.loads((lying / "config.json").read_text())
    config["vocab_size"] = 384
    (lying / "config.json").write_text(json.dumps(config))
    zoo["lying_vocab"] = lying
    return zoo


def _src(path: Path):
    return resolve_model(str(path))


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_read_tensor_infos_matches_safetensors(tiny_zoo, odd_zoo):
    for path, dtype in [(tiny_zoo["base"], torch.float32), (odd_zoo["bf16"], torch.bfloat16)]:
        src = _src(path)
        infos = read_tensor_infos(src)
        with safe_open(str(src.weight_files[0]), framework="pt") as st:
            assert set(infos) == set(st.keys())
            for name in st.keys():
                t = st.get_tensor(name)
                assert infos[name].shape == tuple(t.shape)
                assert t.dtype == dtype
        assert {i.dtype for i in infos.values()} == {"F32" if dtype == torch.float32 else "BF16"}
    assert read_tensor_infos(_src(tiny_zoo["base"]))[EMBED] == TensorInfo(shape=(384, 32),
                                                                          dtype="F32")


def test_read_tensor_infos_from_pickle(tiny_zoo, tmp_path):
    from safetensors.torch import load_file

    model = tmp_path / "pkl"
    model.mkdir()
    shutil.copy(tiny_zoo["base"] / "config.json", model)
    state = load_file(tiny_zoo["base"] / "model.safetensors")
    state = {k: v.to(torch.float16) for k, v in state.items()}
    torch.save(state, model / "pytorch_model.bin")
    infos = read_tensor_infos(resolve_model(str(model), allow_pickle=True))
    assert infos == {k: TensorInfo(shape=tuple(v.shape), dtype="F16") for k, v in state.items()}


def test_fine_tunes_of_one_base_pass(tiny_zoo, odd_zoo):
    sources = [_src(tiny_zoo[k]) for k in ("base", "ft_a", "ft_b", "ft_c")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_compatible(sources)
        # dtypes may differ: the merge casts
        check_compatible([sources[0], _src(odd_zoo["bf16"])])


def test_architecture_mismatch(tiny_zoo, odd_zoo):
    with pytest.raises(IncompatibleModelsError) as err:
        check_compatible([_src(tiny_zoo["base"]), _src(odd_zoo["mistral"])])
    msg = _one_line(err)
    assert f"model '{odd_zoo['mistral']}'" in msg
    assert "MistralForCausalLM" in msg and "LlamaForCausalLM" in msg and "'mistral'" in msg
    assert "fine-tunes of one base model" in msg


def test_architecture_checked_even_when_stacking(tiny_zoo, odd_zoo):
    with pytest.raises(IncompatibleModelsError, match="MistralForCausalLM"):
        check_compatible([_src(tiny_zoo["base"]), _src(odd_zoo["mistral"])], same_layers=False)


def test_missing_layers(tiny_zoo, odd_zoo):
    base, shallow = _src(tiny_zoo["base"]), _src(odd_zoo["shallow"])
    with pytest.raises(IncompatibleModelsError) as err:
        check_compatible([base, shallow])
    msg = _one_line(err)
    # layers 2 and 3 have 9 tensors each in a Llama: one named, the other 17 counted
    assert f"model '{shallow.ref}' lacks tensor 'model.layers.2." in msg
    assert f"'{base.ref}' (the reference model)" in msg
    assert "17 other tensor(s)" in msg and "slices" in msg


def test_extra_layers(tiny_zoo, odd_zoo):
    base, shallow = _src(tiny_zoo["base"]), _src(odd_zoo["shallow"])
    with pytest.raises(IncompatibleModelsError) as err:
        check_compatible([shallow, base])
    msg = _one_line(err)
    assert f"model '{base.ref}' has tensor 'model.layers.2." in msg
    assert f"'{shallow.ref}' (the reference model) lacks" in msg


def test_different_depth_is_fine_when_stacking(tiny_zoo, odd_zoo):
    check_compatible([_src(tiny_zoo["base"]), _src(odd_zoo["shallow"])], same_layers=False)


@pytest.mark.parametrize("same_layers", [True, False])
def test_shape_mismatch(tiny_zoo, odd_zoo, same_layers):
    wide = _src(odd_zoo["wide"])
    with pytest.raises(IncompatibleModelsError) as err:
        check_compatible([_src(tiny_zoo["base"]), wide], same_layers=same_layers)
    msg = _one_line(err)
    # lm_head.weight sorts first: [384, 48] against [384, 32]
    assert f"model '{wide.ref}' tensor 'lm_head.weight' has shape [384, 48]" in msg
    assert "has [384, 32]" in msg


def test_vocab_size_mismatch(tiny_zoo, odd_zoo):
    big = _src(odd_zoo["big_vocab"])
    with pytest.raises(IncompatibleModelsError) as err:
        check_compatible([_src(tiny_zoo["base"]), big])
    msg = _one_line(err)
    assert f"model '{big.ref}' has vocab_size 400" in msg and "has 384" in msg
    assert "tokenizer_source" in msg


def test_embedding_rows_mismatch_names_the_tensor(tiny_zoo, odd_zoo):
    lying = _src(odd_zoo["lying_vocab"])
    with pytest.raises(IncompatibleModelsError) as err:
        check_compatible([_src(tiny_zoo["base"]), lying])
    msg = _one_line(err)
    assert f"model '{lying.ref}' tensor 'lm_head.weight' has 400 vocabulary rows" in msg
    assert "has 384" in msg and "tokenizer_source" in msg


def test_vocab_mismatch_passes_when_rows_are_aligned_by_token(tiny_zoo, odd_zoo):
    # merge_core.vocab rebuilds every model's rows for the output vocabulary first.
    pair = [_src(tiny_zoo["base"]), _src(odd_zoo["big_vocab"])]
    with pytest.raises(IncompatibleModelsError, match="vocab_size 400.*tokenizer_source"):
        check_compatible(pair, tokenizer_source="base")
    check_compatible(pair, tokenizer_source="base", align_vocab=True)


def test_tokenizer_mismatch(tiny_zoo, odd_zoo):
    other = _src(odd_zoo["other_tok"])
    with pytest.raises(IncompatibleModelsError) as err:
        check_compatible([_src(tiny_zoo["base"]), _src(tiny_zoo["ft_b"]), other])
    msg = _one_line(err)
    assert f"model '{other.ref}' has a different tokenizer" in msg
    assert "its tokenizer.json lacks token" in msg and "other token(s) differ" in msg
    assert "tokenizer_source" in msg


def test_tokenizer_mismatch_with_tokenizer_source_warns(tiny_zoo, odd_zoo):
    with pytest.warns(UserWarning, match="different tokenizer.*tokenizer_source 'union'"):
        check_compatible([_src(tiny_zoo["base"]), _src(odd_zoo["other_tok"])],
                         tokenizer_source="union")


def test_precomputed_infos_are_used(tiny_zoo):
    base, ft = _src(tiny_zoo["base"]), _src(tiny_zoo["ft_a"])
    infos = {base.ref: read_tensor_infos(base), ft.ref: dict(read_tensor_infos(ft))}
    check_compatible([base, ft], infos=infos)
    name = "model.layers.0.mlp.up_proj.weight"
    infos[ft.ref][name] = TensorInfo(shape=(1, 2), dtype="F32")
    with pytest.raises(IncompatibleModelsError, match=rf"tensor '{name}' has shape \[1, 2\]"):
        check_compatible([base, ft], infos=infos)


def test_a_single_source_is_trivially_compatible(tiny_zoo):
    check_compatible([_src(tiny_zoo["base"])])
    check_compatible([])


def test_tokenizer_with_swapped_ids(tiny_zoo, tmp_path):
    swapped = shutil.copytree(tiny_zoo["ft_a"], tmp_path / "swapped")
    data = json.loads((swapped / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (swapped / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(IncompatibleModelsError) as err:
        check_compatible([_src(tiny_zoo["base"]), _src(swapped)])
    msg = _one_line(err)
    assert f"gives token {first!r} id {vocab[first]}, the reference id {vocab[second]}" in msg
    assert "1 other token(s) differ too" in msg
