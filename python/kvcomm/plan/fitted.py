"""Fitted anchor weights: the `fit` estimator (kvcomm.plan.estimators).

KVCOMM weights each anchor's recorded deltas by a softmax of its distance to the new
content (docs/method.md, "Estimating the offset"). Here the weights are fitted instead, per layer and
separately for keys and values: the convex combination of the anchors' bases that best
reconstructs the new content's base,

    w_l = argmin_{w in simplex} || sum_u w_u F(A_u)_l - F(C)_l ||^2 + ridge * ||w||^2

and the same combination of the anchors' deltas is the offset (of the slot's tokens and of
the agent's segment after it). If a deviation depends on the content about linearly, the
combination that rebuilds the content rebuilds its deviation. F summarises a base per layer
without aligning tokens of different texts: `moments` (default) takes the per-channel mean
and root mean square over the tokens (heads x channels x 2 numbers per layer); `aligned`
compares token t with the anchor's token t (the anchor's first n tokens, as the
placeholder weights of section 5 do). The simplex keeps the combination an interpolation
(no extrapolated offsets); the ridge, scaled by the problem's size, keeps it from
collapsing on one anchor when two explain the content equally well.

Layer 0 gets no offset (it is exact after the move, docs/method.md, "Keys move exactly"), as in the
core. The same anchors as the core are used: long enough, with this agent's deltas.
"""
from __future__ import annotations

import torch

from .. import ops
from .estimators import AnchorEstimator

STATS = ("moments", "aligned")


def project_simplex(w: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of w [..., N] onto the probability simplex."""
    n = w.shape[-1]
    u, _ = torch.sort(w, dim=-1, descending=True)
    css = u.cumsum(dim=-1) - 1.0
    k = torch.arange(1, n + 1, dtype=w.dtype, device=w.device)
    cond = u - css / k > 0
    rho = cond.to(w.dtype).cumsum(dim=-1).argmax(dim=-1, keepdim=True)   # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(w.dtype)
    return (w - theta).clamp_min(0.0)


def simplex_least_squares(G: torch.Tensor, b: torch.Tensor, ridge: float = 1e-2, iters: int = 200) -> torch.Tensor:
    """argmin_{w in simplex} w'Gw - 2b'w + r||w||^2 for a batch: G [B, N, N], b [B, N] -> w [B, N]
    (projected gradient descent; r = ridge * trace(G) / N)."""
    B, N, _ = G.shape
    trace = G.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)          # [B]
    r = (ridge * trace / N).view(B, 1, 1)
    H = G + r * torch.eye(N, dtype=G.dtype, device=G.device)
    step = (1.0 / (trace.view(B, 1) * (1.0 + ridge)))                       # trace(H) >= its top eigenvalue
    w = torch.full((B, N), 1.0 / N, dtype=G.dtype, device=G.device)
    for _ in range(iters):
        grad = torch.bmm(H, w.unsqueeze(-1)).squeeze(-1) - b
        w = project_simplex(w - step * grad)
    return w


def features(x: torch.Tensor, stat: str, n: int) -> torch.Tensor:
    """[L, F] per-layer summary of a base [L, H, T, D] (see the module docstring)."""
    x = x.to(torch.float64)
    if stat == "aligned":
        return x[:, :, :n].reshape(x.shape[0], -1)
    if stat == "moments":
        return torch.cat([x.mean(dim=2), x.pow(2).mean(dim=2).sqrt()], dim=-1).reshape(x.shape[0], -1)
    raise ValueError(f"unknown statistic {stat!r}; use one of {STATS}")


def fit_weights(content: torch.Tensor, anchors: list, stat: str = "moments", ridge: float = 1e-2) -> torch.Tensor:
    """float32 [N, L]: per layer, the simplex weights whose combination of the anchors' bases
    best reconstructs `content` [L, H, n, D] under `features`."""
    n = content.shape[2]
    c = features(content, stat, n)                                          # [L, F]
    A = torch.stack([features(a, stat, n) for a in anchors], dim=1)         # [L, N, F]
    G = torch.bmm(A, A.transpose(1, 2))                                     # [L, N, N]
    b = torch.bmm(A, c.unsqueeze(-1)).squeeze(-1)                           # [L, N]
    return simplex_least_squares(G, b, ridge).t().contiguous().float()


class FittedEstimator(AnchorEstimator):
    estimates_heads = False   # fits weights to a whole content's base
    name = "fit"

    def __init__(self, stat: str = "moments", ridge: float = 1e-2):
        if stat not in STATS:
            raise ValueError(f"unknown statistic {stat!r}; use one of {STATS}")
        self.stat, self.ridge = stat, ridge

    def write(self, planner, plan, i, k, v, *, want_spread=False):
        pool, slot, c, agent = planner.pool, plan.slots[i], plan.contents[i], plan.agent
        (a, b), (sa, sb) = slot.span, slot.segment
        n, seg_len = b - a, sb - sa
        ids, bk, bv, deltas = [], [], [], []
        for info in pool.anchors(c.slot):
            if info.length < n or agent.key not in info.agents:
                continue
            d = pool.anchor_deltas(c.slot, info.id, agent.key)
            if seg_len and (d["seg_k"] is None or d["seg_k"].shape[2] != seg_len):
                continue
            base_k, base_v = pool.anchor_base(c.slot, info.id)
            ids.append(info.id)
            bk.append(base_k)
            bv.append(base_v)
            deltas.append(d)
        if not ids:
            return None
        L, H, _, D = c.base_k.shape
        N = len(ids)

        def per_channel(w):   # [N, L] -> [N, L, H, D], the form fused_offset takes
            return w.view(N, L, 1, 1).expand(N, L, H, D).contiguous()

        wk = per_channel(fit_weights(c.base_k, bk, self.stat, self.ridge))
        wv = per_channel(fit_weights(c.base_v, bv, self.stat, self.ridge))
        inv = planner.rope.inv_freq
        k[:, :, a:b].copy_(ops.fused_offset(c.base_k, [d["ph_k"] for d in deltas], wk, a, inv))
        v[:, :, a:b].copy_(ops.fused_offset(c.base_v, [d["ph_v"] for d in deltas], wv, a))
        if seg_len:
            k[:, :, sa:sb].copy_(ops.fused_offset(agent.seg_k[i], [d["seg_k"] for d in deltas], wk, sa, inv))
            v[:, :, sa:sb].copy_(ops.fused_offset(agent.seg_v[i], [d["seg_v"] for d in deltas], wv, sa))
        if want_spread:
            spread_w = wv[:, :, 0, 0].mean(dim=1, keepdim=True).expand(N, n).contiguous()
            slot.spread = ops.token_spread([d["ph_k"] for d in deltas], spread_w).add_(
                ops.token_spread([d["ph_v"] for d in deltas], spread_w))
        return ids
