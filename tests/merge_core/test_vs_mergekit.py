"""Every deterministic method against mergekit 0.1.5 on tiny float32 models.

Both tools merge the same recipe; every output tensor must agree to a relative error
(max |ours - theirs| / max |theirs|, per tensor) of at most 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from merge_core.io import load_state
from merge_core.materialize import merge_to_disk
from merge_core.recipe import Recipe
from tests.merge_core.families import FAMILIES, MOE, MULTIMODAL

mergekit = pytest.importorskip("mergekit")

TOLERANCE = 1e-5

# {base}, {a}, {b}, {c} are filled with the tiny zoo's folders.
RECIPES = {
    "linear": """
models:
  - {model: "{a}", parameters: {weight: 0.2}}
  - {model: "{b}", parameters: {weight: 0.3}}
  - {model: "{c}", parameters: {weight: 0.5}}
merge_method: linear
dtype: float32
""",
    "linear_gradient_filter": """
models:
  - {model: "{a}", parameters: {weight: [0.1, 0.9, 0.3]}}
  - model: "{b}"
    parameters:
      weight: [{filter: self_attn, value: [1.0, 0.0]}, {value: 0.5}]
merge_method: linear
parameters: {normalize: false}
dtype: float32
""",
    "slerp": """
models:
  - {model: "{base}"}
  - {model: "{a}"}
merge_method: slerp
base_model: "{base}"
parameters:
  t: [{filter: self_attn, value: [0.0, 0.5, 0.3, 0.7, 1.0]}, {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: 0.5}]
dtype: float32
""",
    "nuslerp": """
models:
  - {model: "{a}", parameters: {weight: 0.3}}
  - {model: "{b}", parameters: {weight: 0.7}}
merge_method: nuslerp
dtype: float32
""",
    "nuslerp_base_rowwise": """
models:
  - {model: "{a}", parameters: {weight: 0.6}}
  - {model: "{b}", parameters: {weight: 0.4}}
merge_method: nuslerp
base_model: "{base}"
parameters: {nuslerp_row_wise: true, nuslerp_flatten: false}
dtype: float32
""",
    "task_arithmetic": """
models:
  - {model: "{a}", parameters: {weight: 0.5}}
  - {model: "{b}", parameters: {weight: [0.7, 0.2]}}
merge_method: task_arithmetic
base_model: "{base}"
parameters: {lambda: 0.9}
dtype: float32
""",
    "ties": """
models:
  - {model: "{a}", parameters: {weight: 0.5, density: 0.5}}
  - {model: "{b}", parameters: {weight: [1.0, 0.3, 0.6, 0.2], density: [0.2, 0.9]}}
  - {model: "{c}", parameters: {weight: 0.4, density: 0.7}}
merge_method: ties
base_model: "{base}"
dtype: float32
""",
    "ties_rescale_unnormalized": """
models:
  - {model: "{a}", parameters: {weight: 0.8, density: 0.3}}
  - {model: "{b}", parameters: {weight: 0.6, density: 0.6}}
merge_method: ties
base_model: "{base}"
parameters: {normalize: false, rescale: true, lambda: 1.3}
dtype: float32
""",
    "breadcrumbs": """
models:
  - {model: "{a}", parameters: {weight: 0.5, density: 0.8, gamma: 0.05}}
  - {model: "{b}", parameters: {weight: 0.5, density: 0.6}}
merge_method: breadcrumbs
base_model: "{base}"
dtype: float32
""",
    "breadcrumbs_ties": """
models:
  - {model: "{a}", parameters: {weight: 0.7, density: 0.8, gamma: 0.02}}
  - {model: "{b}", parameters: {weight: 0.4, density: 0.7, gamma: 0.1}}
merge_method: breadcrumbs_ties
base_model: "{base}"
dtype: float32
""",
    "model_stock": """
models:
  - {model: "{a}"}
  - {model: "{b}"}
  - {model: "{c}"}
merge_method: model_stock
base_model: "{base}"
dtype: float32
""",
    "model_stock_filter_wise": """
models:
  - {model: "{a}"}
  - {model: "{b}"}
merge_method: model_stock
base_model: "{base}"
parameters: {filter_wise: true}
dtype: float32
""",
    "passthrough_slices": """
slices:
  - sources: [{model: "{a}", layer_range: [0, 3]}]
  - sources: [{model: "{b}", layer_range: [1, 4]}]
merge_method: passthrough
dtype: float32
""",
    "linear_slices": """
slices:
  - sources:
      - {model: "{a}", layer_range: [0, 2], parameters: {weight: [0.2, 0.8]}}
      - {model: "{b}", layer_range: [2, 4], parameters: {weight: 0.5}}
merge_method: linear
dtype: float32
""",
    "multislerp": """
models:
  - {model: "{a}", parameters: {weight: 0.2}}
  - {model: "{b}", parameters: {weight: [0.7, 0.3]}}
  - {model: "{c}", parameters: {weight: 0.5}}
merge_method: multislerp
dtype: float32
""",
    "multislerp_base": """
models:
  - {model: "{a}", parameters: {weight: 0.6}}
  - {model: "{b}", parameters: {weight: 0.4}}
merge_method: multislerp
base_model: "{base}"
parameters: {normalize_weights: false}
dtype: float32
""",
    "karcher": """
models:
  - {model: "{a}"}
  - {model: "{b}"}
  - {model: "{c}"}
merge_method: karcher
parameters: {max_iter: 20, tol: 1.0e-6}
dtype: float32
""",
    "karcher_base": """
models:
  - {model: "{a}"}
  - {model: "{b}"}
merge_method: karcher
base_model: "{base}"
dtype: float32
""",
    "sce": """
models:
  - {model: "{a}"}
  - {model: "{b}"}
  - {model: "{c}"}
merge_method: sce
base_model: "{base}"
dtype: float32
""",
    "sce_topk": """
models:
  - {model: "{a}"}
  - {model: "{b}"}
  - {model: "{c}"}
merge_method: sce
base_model: "{base}"
parameters: {select_topk: [0.3, 0.8]}
dtype: float32
""",
    "ram": """
models:
  - {model: "{a}"}
  - {model: "{b}"}
  - {model: "{c}"}
merge_method: ram
base_model: "{base}"
parameters: {epsilon: 0.015}
dtype: float32
""",
    "ramplus_tl": """
models:
  - {model: "{a}"}
  - {model: "{b}"}
merge_method: ramplus_tl
base_model: "{base}"
parameters: {epsilon: 0.02, r: 0.3, alpha: 0.5}
dtype: float32
""",
    "nearswap": """
models:
  - {model: "{base}"}
  - {model: "{a}"}
merge_method: nearswap
base_model: "{base}"
parameters: {t: [0.001, 0.03]}
dtype: float32
""",
    "arcee_fusion": """
models:
  - {model: "{base}"}
  - {model: "{a}"}
merge_method: arcee_fusion
base_model: "{base}"
dtype: float32
""",
}
NEW_METHODS = ("multislerp", "karcher", "sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion")


def _fill(text: str, zoo: dict[str, Path]) -> str:
    for key, name in (("base", "base"), ("a", "ft_a"), ("b", "ft_b"), ("c", "ft_c")):
        text = text.replace("{" + key + "}", str(zoo[name]))
    return text


def _run_mergekit(text: str, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(config, str(out), options=MergeOptions(copy_tokenizer=False, quiet=True,
                                                     write_model_card=False))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_matches_mergekit(name: str, tiny_zoo, tmp_path: Path) -> None:
    text = _fill(RECIPES[name], tiny_zoo)
    _run_mergekit(text, tmp_path / "theirs")
    merge_to_disk(Recipe.from_yaml(text), tmp_path / "ours", device="cpu", progress=False)
    theirs = load_state(tmp_path / "theirs")
    ours = load_state(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    worst = 0.0
    for key, ref in theirs.items():
        got = ours[key]
        assert got.shape == ref.shape and got.dtype == ref.dtype, key
        scale = ref.abs().max().item() or 1.0
        worst = max(worst, (got.double() - ref.double()).abs().max().item() / scale)
    assert worst <= TOLERANCE, f"{name}: max relative difference {worst:.3g}"


@pytest.fixture(scope="module")
def wide_zoo(tmp_path_factory) -> dict[str, Path]:
    """Tensors large enough for the sampled top-k search and several chunks."""
    from search.demo.tiny import llama_config, make_llama, make_tokenizer

    root = tmp_path_factory.mktemp("wide")
    make_tokenizer(root / "tok")
    cfg = llama_config(hidden=256, layers=2, intermediate=1100)
    base = make_llama(root / "base", seed=0, config=cfg, tokenizer_dir=root / "tok")
    zoo = {"base": base}
    for i, name in enumerate(["ft_a", "ft_b", "ft_c"], start=1):
        zoo[name] = make_llama(root / name, seed=i, like=base, tokenizer_dir=root / "tok")
    return zoo


@pytest.mark.parametrize("name", ["ties", "ties_rescale_unnormalized", "breadcrumbs_ties", "task_arithmetic"])
def test_matches_mergekit_on_large_tensors(name: str, wide_zoo, tmp_path: Path) -> None:
    from merge_core.methods.sparsify import CHUNK

    text = _fill(RECIPES[name], wide_zoo)
    _run_mergekit(text, tmp_path / "theirs")
    merge_to_disk(Recipe.from_yaml(text), tmp_path / "ours", device="cpu", progress=False)
    theirs = load_state(tmp_path / "theirs")
    ours = load_state(tmp_path / "ours")
    assert max(t.numel() for t in theirs.values()) > CHUNK
    inputs = {m: load_state(wide_zoo[m]) for m in ("base", "ft_a", "ft_b", "ft_c")}
    for key, ref in theirs.items():
        scale = ref.abs().max().item() or 1.0
        off = ((ours[key].double() - ref.double()).abs() / scale > TOLERANCE).reshape(-1)
        # The one documented difference: mergekit keeps exactly k of several entries whose
        # |delta| ties at the cut-off (which ones is up to its sort); brmerge keeps them all.
        # Any other element must agree.
        assert int(off.sum()) <= 2, f"{name} {key}: {int(off.sum())} elements differ"
        for j in off.nonzero().flatten().tolist():
            deltas = [(inputs[m][key] - inputs["base"][key]).abs().reshape(-1) for m in ("ft_a", "ft_b", "ft_c")]
            assert any(int((d == d[j]).sum()) > 1 for d in deltas), f"{name} {key}[{j}] differs without a tie"


# Recipes run on every family; MoE outputs are compared after loading (mergekit writes
# transformers' fused expert tensors, brmerge the hub's per-expert ones).
FAMILY_RECIPES = ("linear", "slerp", "nuslerp", "ties", "task_arithmetic", "model_stock", "passthrough_slices",
                  *NEW_METHODS)
# mergekit 0.1.5 writes a config transformers refuses when it stacks these (layer_types keeps
# the source depth); brmerge's stacked outputs are checked in test_families.py.
_MERGEKIT_STACK_FAILS = ("qwen3", "gemma2", "gemma3_text")


def _loaded_state(folder: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


# On MoE models the methods that look at a whole tensor (slerp's angle, top-k, model stock's
# cosine) see one expert here and all experts fused in mergekit; element-wise ones agree exactly.
MOE_RECIPES = ("linear", "task_arithmetic", "passthrough_slices")
FAMILY_CASES = [(f, n) for f in (*FAMILIES, *MULTIMODAL)
                for n in (MOE_RECIPES if f in MOE else FAMILY_RECIPES)]


@pytest.mark.parametrize("family, name", FAMILY_CASES)
def test_matches_mergekit_on_every_family(family: str, name: str, family_zoo, tmp_path: Path) -> None:
    if name == "passthrough_slices" and family in _MERGEKIT_STACK_FAILS:
        pytest.skip("mergekit 0.1.5 writes an unloadable config for this stack")
    if name == "passthrough_slices" and family in MULTIMODAL:
        pytest.skip("mergekit 0.1.5 stacks multimodal models only with its modules: syntax")
    text = _fill(RECIPES[name], family_zoo(family))
    _run_mergekit(text, tmp_path / "theirs")
    merge_to_disk(Recipe.from_yaml(text), tmp_path / "ours", device="cpu", progress=False)
    if family in MOE:
        theirs, ours = _loaded_state(tmp_path / "theirs"), _loaded_state(tmp_path / "ours")
    else:
        theirs, ours = load_state(tmp_path / "theirs"), load_state(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    worst = max(_rel_diff(ours[k], ref) for k, ref in theirs.items())
    assert worst <= TOLERANCE, f"{family} {name}: max relative difference {worst:.3g}"


def _rel_diff(got, ref) -> float:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    scale = ref.abs().max().item() or 1.0
    return (got.double() - ref.double()).abs().max().item() / scale


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "gemma", "gemma2"])
@pytest.mark.parametrize("head_on", ["base", "fine_tune"])
def test_saved_head_on_a_tied_model_matches_mergekit(family: str, head_on: str, tiny_zoo, tmp_path: Path) -> None:
    from tests.merge_core.families import make_family
    from tests.merge_core.test_families import _with_saved_head

    zoo = make_family(family, tmp_path, tokenizer_dir=tiny_zoo["tokenizer"], fine_tunes=2, tie=True)
    saved = _with_saved_head(zoo["base" if head_on == "base" else "ft_a"], tmp_path / "with-head")
    base, ft = (saved, zoo["ft_a"]) if head_on == "base" else (zoo["base"], saved)
    text = f"""
models:
  - {{model: "{ft}", parameters: {{weight: 0.7, density: 0.6}}}}
  - {{model: "{zoo['ft_b']}", parameters: {{weight: 0.3, density: 0.8}}}}
merge_method: ties
base_model: "{base}"
dtype: float32
"""
    _run_mergekit(text, tmp_path / "theirs")
    merge_to_disk(Recipe.from_yaml(text), tmp_path / "ours", device="cpu", progress=False)
    theirs, ours = load_state(tmp_path / "theirs"), load_state(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    assert max(_rel_diff(ours[k], ref) for k, ref in theirs.items()) <= TOLERANCE
