"""Campaign keys of the worker's compute and memory: eval.dtype, eval.max_batch_tokens,
workers.sources."""

from __future__ import annotations

import pytest
import torch

from merge_core.dtypes import COMPUTE_DTYPES, compute_dtype
from merge_core.errors import BrmergeError
from search.campaign import CampaignError, parse_campaign


def _campaign(eval=None, workers=None):
    return parse_campaign({"name": "c", "base_model": "base", "models": ["a", "b"], "method": "ties",
                           "eval": {"suite": "sample", "limit": 8, **(eval or {})},
                           "workers": workers or {}})


def test_defaults_and_choices():
    c = _campaign()
    assert (c.dtype, c.max_batch_tokens, c.sources) == ("auto", 16384, "device")
    c = _campaign(eval={"dtype": "bfloat16", "max_batch_tokens": 4096}, workers={"sources": "host"})
    assert (c.dtype, c.max_batch_tokens, c.sources) == ("bfloat16", 4096, "host")


@pytest.mark.parametrize("key,value,message", [
    ("dtype", "fp8", "eval.dtype 'fp8' must be one of auto, bfloat16, float16, float32"),
    ("max_batch_tokens", 0, "eval.max_batch_tokens 0 must be a positive number of tokens"),
    ("max_batch_tokens", True, "eval.max_batch_tokens True must be a positive"),
])
def test_bad_eval_values_are_one_line_errors(key, value, message):
    with pytest.raises(CampaignError, match=message):
        _campaign(eval={key: value})


def test_bad_sources_is_a_one_line_error():
    with pytest.raises(CampaignError, match="workers.sources 'gpu' must be one of device, host, auto"):
        _campaign(workers={"sources": "gpu"})


def test_compute_dtype_auto_is_the_checkpoints_on_cuda_and_float32_elsewhere():
    assert COMPUTE_DTYPES == ("auto", "bfloat16", "float16", "float32")
    assert compute_dtype("auto", checkpoint_dtype="BF16", device="cuda") == torch.bfloat16
    assert compute_dtype("auto", checkpoint_dtype=torch.float16, device="cuda:0") == torch.float16
    assert compute_dtype("auto", checkpoint_dtype="float32", device="cuda") == torch.float32
    assert compute_dtype("auto", checkpoint_dtype=None, device="cuda") == torch.float32
    assert compute_dtype("auto", checkpoint_dtype="bfloat16", device="cpu") == torch.float32
    assert compute_dtype("float16", checkpoint_dtype=None, device="cpu") == torch.float16
    with pytest.raises(BrmergeError, match="'fp8' is not one of auto, bfloat16, float16, float32"):
        compute_dtype("fp8", checkpoint_dtype=None, device="cpu")


def test_magnitude_cache_setting():
    assert _campaign().magnitude_cache == "auto"
    assert _campaign(workers={"magnitude_cache": "off"}).magnitude_cache == "off"
    assert _campaign(workers={"magnitude_cache": 0}).magnitude_cache == "off"
    assert _campaign(workers={"magnitude_cache": "20GB"}).magnitude_cache == "20GB"
    with pytest.raises(CampaignError, match="workers.magnitude_cache 'lots' must be auto, off or a size"):
        _campaign(workers={"magnitude_cache": "lots"})
