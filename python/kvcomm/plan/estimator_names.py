"""Estimators by name: what `PlanSettings.estimator`, `--method` and `--paired-variant`
accept (the estimators themselves: kvcomm.plan.estimators and kvcomm.plan.fitted)."""
from __future__ import annotations

from .estimators import AnchorEstimator, AnchorsOrBaseEstimator, BaseEstimator, Estimator, PrefixOnlyEstimator
from .fitted import FittedEstimator


def _fitted(stat: str):
    def make():
        est = FittedEstimator(stat)
        est.name = "fit" if stat == "moments" else f"fit-{stat}"
        return est
    return make


ESTIMATORS = {"anchors": AnchorEstimator, "base": BaseEstimator, "none": PrefixOnlyEstimator,
              "anchors-or-base": AnchorsOrBaseEstimator,
              "fit": _fitted("moments"), "fit-aligned": _fitted("aligned")}
DEFAULT_ESTIMATOR = "anchors"


def make_estimator(name: "str | Estimator | None") -> Estimator:
    if name is None:
        name = DEFAULT_ESTIMATOR
    if isinstance(name, Estimator):
        return name
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; use one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]()
