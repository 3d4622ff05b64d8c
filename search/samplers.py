"""Samplers: a name -> a factory of a seeded Optuna sampler, tuned for asynchronous ask/tell.

``SAMPLERS`` is the one table: campaign validation reads its names, ``make_sampler`` its
factories. Adding a sampler is one function and one line in the table; the conformance test
(tests/search/test_samplers.py) then runs it and asks, in ``MODEL_BASED``, whether its model
should propose trials within a short campaign, and checks that the sampler lists in the
template and the docs name every sampler of the table.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import optuna

from merge_core.errors import BrmergeError

Factory = Callable[..., optuna.samplers.BaseSampler]


def _cmaes(*, seed: int, x0: Mapping[str, float] | None, n_baselines: int) -> optuna.samplers.BaseSampler:
    # Start from the equal-weight merge, the strongest simple baseline (step: Optuna's default,
    # a sixth of each range). x0 is deprecated since Optuna 4.9 but still the way to set the
    # mean in 5.x; pruned trials carry a stage-1 score, which still tells CMA-ES where not to go.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.CmaEsSampler(x0=dict(x0) if x0 else None, seed=seed, n_startup_trials=0,
                                            warn_independent_sampling=False, consider_pruned_trials=True)


def _tpe(*, seed: int, x0: Mapping[str, float] | None, n_baselines: int) -> optuna.samplers.BaseSampler:
    # constant_liar: concurrent workers do not all sample the same promising point.
    # (warn_independent_sampling is deprecated since Optuna 4.9 and already off by default.)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                      n_startup_trials=max(10, n_baselines + 5))


def _nsga2(*, seed: int, x0: Mapping[str, float] | None, n_baselines: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed)


def _gp(*, seed: int, x0: Mapping[str, float] | None, n_baselines: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=max(10, n_baselines + 5),
                                     warn_independent_sampling=False)


def _random(*, seed: int, x0: Mapping[str, float] | None, n_baselines: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


SAMPLERS: dict[str, Factory] = {
    "tpe": _tpe,         # the default (docs/campaigns.md, "Choosing a sampler")
    "cmaes": _cmaes,
    "nsga2": _nsga2,     # multi-objective: a Pareto front over the objectives
    "gp": _gp,
    "random": _random,
}
MULTI_OBJECTIVE = frozenset({"nsga2"})


def make_sampler(name: str, *, seed: int, x0: Mapping[str, float] | None = None,
                 n_baselines: int = 0) -> optuna.samplers.BaseSampler:
    try:
        factory = SAMPLERS[name]
    except KeyError:
        raise BrmergeError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}") from None
    return factory(seed=seed, x0=x0, n_baselines=n_baselines)
