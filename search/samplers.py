"""A sampler name -> an Optuna sampler, seeded, tuned for asynchronous ask/tell."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import optuna


def make_sampler(name: str, *, seed: int, x0: Mapping[str, float] | None = None,
                 n_baselines: int = 0) -> optuna.samplers.BaseSampler:
    if name == "cmaes":
        # Start from the equal-weight merge, the strongest simple baseline (step: Optuna's
        # default, a sixth of each range).
        # x0 is deprecated since Optuna 4.9 but still the way to set the mean in 5.x; pruned
        # trials carry a stage-1 score, which still tells CMA-ES where not to go.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.CmaEsSampler(x0=dict(x0) if x0 else None, seed=seed, n_startup_trials=0,
                                                warn_independent_sampling=False, consider_pruned_trials=True)
    if name == "tpe":
        # constant_liar: concurrent workers do not all sample the same promising point
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=max(10, n_baselines + 5),
                                          warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=max(10, n_baselines + 5),
                                         warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}: choose cmaes, tpe, nsga2, gp or random")
