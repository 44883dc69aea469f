"""benchmarks/engine_quality.py: how sure dense was of its first token, where the reuse
call's token ranks in dense's distribution, and agreement grouped by that margin."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvcomm_app.bench import engine_quality as quality


def _call(probs, token):
    return SimpleNamespace(first_logits=torch.tensor(probs).log(), first_token_id=token)


def test_margin_and_rank_come_from_the_dense_distribution():
    dense = _call([0.5, 0.3, 0.15, 0.05], 0)
    assert quality._dense_view_of(dense, dense) == {"dense_margin": pytest.approx(0.2), "rank_in_dense": 0}
    assert quality._dense_view_of(_call([0.1, 0.1, 0.7, 0.1], 2), dense)["rank_in_dense"] == 2
    assert quality._dense_view_of(_call([0.1, 0.8, 0.05, 0.05], 1), dense)["rank_in_dense"] == 1


def test_agreement_is_grouped_by_margin_and_misses_are_described():
    rows = [dict(agree=True, dense_margin=0.05, rank_in_dense=0),
            dict(agree=False, dense_margin=0.02, rank_in_dense=1),
            dict(agree=False, dense_margin=0.2, rank_in_dense=7),
            dict(agree=True, dense_margin=0.9, rank_in_dense=0),
            dict(agree=True, dense_margin=1.0, rank_in_dense=0)]
    got = quality.agreement_by_dense_margin(rows)
    assert got["bins"]["0.0-0.1"] == {"calls": 2, "top1_agreement": 0.5}
    assert got["bins"]["0.1-0.3"] == {"calls": 1, "top1_agreement": 0.0}
    assert got["bins"]["0.3-1.0"] == {"calls": 2, "top1_agreement": 1.0}
    assert got["disagreements"] == 2
    assert got["disagreement_dense_margin_median"] == pytest.approx(0.11)
    assert got["disagreement_picked_dense_second"] == 1
    assert got["disagreement_picked_dense_top5"] == 1
    assert quality.agreement_by_dense_margin([dict(agree=True)]) == {}
