"""Named methods: an estimator and a recompute policy (kvcomm.plan.estimators,
kvcomm.plan.recompute) under the names the comparisons use.

    method_settings("cacheblend:0.15")  ->  {"estimator": "base", "recompute": "deviation,budget=0.15"}

- `kvcomm`: anchors, the last token only (the method as published, with this project's
  4-anchor default and partial calls);
- `prefix`: nothing reused after the exact prefix (prefix caching, the baseline a user
  runs without KVCOMM);
- `cacheblend:R`: every content's base moved to its position with no offsets, the share R of
  the tokens after S0 recomputed, chosen by their KV deviation on an early layer (layer 1)
  measured by a probe over every token after S0. As CacheBlend (Yao et al., EuroSys 2025):
  the bases (each chunk's KV computed apart), the selection (highest K/V deviation on an
  early layer, every token a candidate), the recompute ratio over the reused tokens, the
  probed layers keeping their computed KV for every token. Not as CacheBlend: one probe
  layer instead of its gradual filtering over the first layers; the selected tokens are
  recomputed from layer 0 (CacheBlend carries them on from the probe layer), so they cost
  the probe's layers twice; the deviation is summed over K and V; the agent's own template
  segments are chunks too (their KV from the template's own forward);
- `epic:K`: the bases as above and the first K tokens of every chunk recomputed - each
  content and each of the agent's own segments after it (EPIC's LegoLink, Hu et al. 2024,
  recomputes each chunk's first tokens);
- `hybrid-deviation:R`, `hybrid-spread:R`: KVCOMM's anchor estimate plus the share R
  recomputed, chosen by the probe's deviation or by the anchors' disagreement (spread);
- `fit`, `fit-deviation:R`: the fitted anchor weights (kvcomm.plan.fitted), alone or with
  deviation-selected recompute;
- `anchors-or-base`, `anchors-or-base-deviation:R`: anchors where the pool can estimate a
  slot, the moved base where it cannot (no partial calls), alone or with deviation-selected
  recompute.
"""
from __future__ import annotations


def _fraction(name: str, value: str) -> float:
    r = float(value)
    if not 0 <= r <= 1:
        raise ValueError(f"method {name}: the recomputed share must be in [0, 1], got {value}")
    return r


def _budget(policy: str, r: float) -> str:
    return "none" if r == 0 else f"{policy},budget={r:g}"


_METHODS = {
    "kvcomm": (False, lambda v: {"estimator": "anchors", "recompute": "none"}),
    "prefix": (False, lambda v: {"estimator": "none", "recompute": "none"}),
    "fit": (False, lambda v: {"estimator": "fit", "recompute": "none"}),
    "cacheblend": (True, lambda v: {"estimator": "base", "recompute": _budget("deviation", _fraction("cacheblend", v))}),
    "epic": (True, lambda v: {"estimator": "base", "recompute": "none" if int(v) == 0 else f"first={int(v)},segfirst={int(v)}"}),
    "hybrid-deviation": (True, lambda v: {"estimator": "anchors",
                                          "recompute": _budget("deviation", _fraction("hybrid-deviation", v))}),
    "hybrid-spread": (True, lambda v: {"estimator": "anchors",
                                       "recompute": _budget("spread", _fraction("hybrid-spread", v))}),
    "fit-deviation": (True, lambda v: {"estimator": "fit",
                                       "recompute": _budget("deviation", _fraction("fit-deviation", v))}),
    "anchors-or-base": (False, lambda v: {"estimator": "anchors-or-base", "recompute": "none"}),
    "anchors-or-base-deviation": (True, lambda v: {
        "estimator": "anchors-or-base", "recompute": _budget("deviation", _fraction("anchors-or-base-deviation", v))}),
}
METHODS = tuple(_METHODS)


def method_settings(spec: str) -> dict:
    """'name' or 'name:value' -> {"estimator": ..., "recompute": ...}; ValueError otherwise."""
    name, _, value = spec.partition(":")
    if name not in _METHODS:
        raise ValueError(f"unknown method {spec!r}; use one of {', '.join(METHODS)} (e.g. cacheblend:0.15, epic:4)")
    takes, make = _METHODS[name]
    if takes != bool(value):
        raise ValueError(f"method {name} " + ("takes a value after ':' (e.g. " + name + ":0.1)" if takes
                                              else "takes no value"))
    try:
        return make(value)
    except ValueError as e:
        raise ValueError(f"method {spec!r}: {e}") from None
