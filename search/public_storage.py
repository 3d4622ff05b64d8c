"""A storage for readers outside brmerge (optuna-dashboard): reads with credentials masked,
writes refused unless asked for."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import optuna

from search.storage import StorageError, public_campaign
from search.trials import S_CAMPAIGN


class ReadOnlyStorageError(StorageError):
    """A write through a read-only ``PublicStorage``."""


def _public_user_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(attrs)
    if isinstance(out.get(S_CAMPAIGN), Mapping):
        out[S_CAMPAIGN] = public_campaign(out[S_CAMPAIGN])
    return out


class PublicStorage(optuna.storages.BaseStorage):
    """An Optuna storage for servers such as optuna-dashboard: reads pass through with the
    campaign's storage URL masked (studies written before masking included); writes (create,
    delete, attributes, tell) raise ``ReadOnlyStorageError`` unless ``writable=True``."""

    def __init__(self, inner: optuna.storages.BaseStorage, *, writable: bool = False) -> None:
        self.inner = inner
        self.writable = writable

    def _write(self, what: str) -> None:
        if not self.writable:
            raise ReadOnlyStorageError(f"read-only storage: {what} refused; serve with --allow-edits to allow it")

    # -- writes ------------------------------------------------------------------------------
    def create_new_study(self, directions: Any, study_name: str | None = None) -> int:
        self._write("creating a study")
        return self.inner.create_new_study(directions, study_name=study_name)

    def delete_study(self, study_id: int) -> None:
        self._write("deleting a study")
        self.inner.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._write("setting a study attribute")
        self.inner.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._write("setting a study attribute")
        self.inner.set_study_system_attr(study_id, key, value)

    def create_new_trial(self, study_id: int, template_trial: optuna.trial.FrozenTrial | None = None) -> int:
        self._write("creating a trial")
        return self.inner.create_new_trial(study_id, template_trial=template_trial)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: optuna.distributions.BaseDistribution) -> None:
        self._write("setting a trial parameter")
        self.inner.set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def set_trial_state_values(self, trial_id: int, state: optuna.trial.TrialState,
                               values: Any = None) -> bool:
        self._write("telling a trial")
        return self.inner.set_trial_state_values(trial_id, state, values=values)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._write("reporting a value")
        self.inner.set_trial_intermediate_value(trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write("setting a trial attribute")
        self.inner.set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write("setting a trial attribute")
        self.inner.set_trial_system_attr(trial_id, key, value)

    # -- reads -------------------------------------------------------------------------------
    def get_all_studies(self) -> list[Any]:
        out = []
        for s in self.inner.get_all_studies():
            s = copy.copy(s)
            s.user_attrs = _public_user_attrs(s.user_attrs)
            out.append(s)
        return out

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return _public_user_attrs(self.inner.get_study_user_attrs(study_id))

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self.inner.get_study_system_attrs(study_id)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self.inner.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self.inner.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[optuna.study.StudyDirection]:
        return self.inner.get_study_directions(study_id)

    def get_trial(self, trial_id: int) -> optuna.trial.FrozenTrial:
        return self.inner.get_trial(trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states: Any = None) -> list[optuna.trial.FrozenTrial]:
        return self.inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)

    def get_n_trials(self, study_id: int, state: Any = None) -> int:
        return self.inner.get_n_trials(study_id, state=state)

    def get_best_trial(self, study_id: int) -> optuna.trial.FrozenTrial:
        return self.inner.get_best_trial(study_id)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self.inner.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def remove_session(self) -> None:
        self.inner.remove_session()
