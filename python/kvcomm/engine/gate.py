"""Correctness gate: does reuse work for this model? Measured once per model, before use.

KVCOMM's offsets are estimates (docs/method.md, "Estimating the offset"). For most models they are close enough
that the reuse path picks the same tokens as dense prefill; for some (an unusual
architecture, a quantisation, a bug) they are not, and every reused call would then be
silently wrong. The gate measures this before the engine reuses anything. It sits
above the engine and drives it through its public API only:

    res = gate.apply(engine, GateConfig())   # check, then engine.refuse_reuse(reason or None)

- check(engine, cfg) returns the GateResult (and changes nothing); apply() also sets the
  engine's refusal, after which every kvcomm-mode call runs dense with the gate's reason.

- a probe engine (same model, tokenizer, lead-ins and pool parameters; its own fresh
  pool, so the caller's pool is untouched) gets two agents: `gate_a` reads a question,
  `gate_b` reads the same question and `gate_a`'s reply (both slot kinds the method
  shares: an encoded question and a captured reply);
- `warmup` generated questions fill its pools densely (a slot shares from 2 anchors);
- each of `probes` further generated questions runs every agent through the real
  engine paths in kvcomm mode and again in dense mode on identical inputs. For each
  kvcomm call that took the reuse path: does its first token agree with dense's, and how
  far is its assembled KV from the dense KV (relative Frobenius error over layers >= 1)?
- a call *agrees* when the reuse path's first token is one dense prefill rates at least
  `tie_ratio` times as likely as its own top token (1.0 = strict top-1 agreement). Small
  models have flat first-token distributions where two tokens are near-ties, and a strict
  argmax flips on any perturbation; a broken estimate picks tokens dense rates near 0.
  Strict top-1 agreement is reported too.
- reuse is allowed when agreement >= `threshold` and the mean KV error <= `max_kv_error`
  over at least `min_pairs` reuse-path calls. Too few reuse-path calls is "inconclusive"
  and refused: the gate never allows what it did not measure.

The result is cached per model identity (config, a weights fingerprint, dtype, device,
the pool parameters and lead-ins that change estimates, the gate settings): in memory
for the process and, unless disabled, as JSON under models.cache_root()/gate.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from .._C import AnchorPool, PoolConfig
from .engine import KVCommEngine

GATE_VERSION = 1          # bump when the probe changes: old disk entries stop matching
REASON_PREFIX = "correctness gate"


@dataclass(frozen=True)
class GateConfig:
    """threshold: minimum first-token agreement of reuse-path calls with dense.
    tie_ratio: a reuse token agrees when dense rates it >= tie_ratio x its top token.
    max_kv_error: maximum mean relative KV error (layers >= 1); None = not checked. The
      default is a loose sanity bound: SmolLM2-135M measures about 0.1, an estimate
      unrelated to the real KV about 1 or more.
    probes / warmup: generated questions measured / used to fill the probe pool.
    min_pairs: fewer reuse-path calls than this is inconclusive (refused).
    reply_tokens: reply length of the probe's first agent (its reply is a slot of the second).
    disk_cache: also keep results under models.cache_root()/gate."""
    threshold: float = 0.9
    tie_ratio: float = 0.5
    max_kv_error: float | None = 0.5
    probes: int = 6
    warmup: int = 3
    min_pairs: int = 6
    reply_tokens: int = 8
    seed: int = 0
    disk_cache: bool = True

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.01:
            raise ValueError(f"gate threshold must be in [0, 1.01], got {self.threshold}")
        if self.probes < 1 or self.warmup < 2:
            raise ValueError(f"gate needs probes >= 1 and warmup >= 2 (a slot shares from 2 anchors), "
                             f"got probes={self.probes}, warmup={self.warmup}")
        if self.min_pairs < 1:
            raise ValueError(f"gate min_pairs must be >= 1, got {self.min_pairs}")
        if not 0.0 < self.tie_ratio <= 1.0:
            raise ValueError(f"gate tie_ratio must be in (0, 1], got {self.tie_ratio}")
        if self.reply_tokens < 2:
            raise ValueError(f"gate reply_tokens must be >= 2, got {self.reply_tokens}")


@dataclass
class GateResult:
    allowed: bool
    reason: str                   # "correctness gate: ..." (shown on every refused call)
    agreement: float | None       # first-token agreement of reuse-path probe calls with dense
    top1_agreement: float | None  # the same, strict argmax equality
    pairs: int                    # reuse-path probe calls compared
    calls: int                    # kvcomm probe calls made (reuse + dense)
    kv_error: float | None        # mean relative KV error of the reuse path (layers >= 1)
    kv_error_max: float | None
    threshold: float
    max_kv_error: float | None
    seconds: float                # probe wall time (0 when it came from a cache)
    key: str
    source: str = "probe"         # "probe", "memory" or "disk"
    details: list = field(default_factory=list)   # per compared call

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GateResult":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ------------------------------------------------------------------ model identity

def weights_fingerprint(model) -> str:
    """sha1 over every parameter and buffer: name, shape, dtype, the float64 sum and abs
    sum, and an evenly strided sample of values. Catches a different checkpoint or an
    in-place edit without hashing every byte."""
    h = hashlib.sha1()
    with torch.no_grad():
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        for name, t in tensors:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            if flat.is_floating_point():
                sums = torch.stack([flat.sum(dtype=torch.float64), flat.abs().sum(dtype=torch.float64)])
                h.update(sums.cpu().numpy().tobytes())
                step = max(1, flat.numel() // 512)
                h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
            else:
                h.update(flat[:: max(1, flat.numel() // 512)].cpu().numpy().tobytes())
    return h.hexdigest()


def code_fingerprint() -> str:
    """sha1 of the engine's and the HF glue's sources and the core extension: a disk entry
    written by other code (a fix, a regression) must not vouch for this code."""
    import kvcomm
    root = os.path.dirname(os.path.abspath(kvcomm.__file__))
    h = hashlib.sha1()
    for sub in ("engine", "hf"):
        folder = os.path.join(root, sub)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
    ext = getattr(getattr(kvcomm, "_C", None), "__file__", None)
    if ext and os.path.exists(ext):
        st = os.stat(ext)
        h.update(f"{os.path.basename(ext)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def model_key(model, spec, pool_config, lead_ins: dict, cfg: GateConfig, recompute: str = "none") -> str:
    """The gate's cache key: everything that changes what the probe would measure (the
    recompute policy included: the probe runs the engine's own reuse path)."""
    config = model.config.to_dict()
    config.pop("_attn_implementation_internal", None)
    config.pop("_attn_implementation", None)
    pool = {k: getattr(pool_config, k) for k in ("gamma", "tau", "top_p", "distance")}
    gate = {k: v for k, v in asdict(cfg).items() if k != "disk_cache"}
    blob = json.dumps({"v": GATE_VERSION, "code": code_fingerprint(), "config": config, "weights": weights_fingerprint(model),
                       "dtype": str(spec.dtype), "device": str(spec.device), "pool": pool,
                       "lead_ins": lead_ins, "gate": gate, "recompute": recompute},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


# ------------------------------------------------------------------ caches

_memory: dict[str, GateResult] = {}
_lock = threading.Lock()


def clear_memory_cache() -> None:
    with _lock:
        _memory.clear()


def _disk_path(key: str) -> str:
    from ..models import cache_root
    return os.path.join(cache_root(), "gate", f"{key}.json")


def _read_disk(key: str) -> GateResult | None:
    try:
        with open(_disk_path(key), encoding="utf-8") as f:
            d = json.load(f)
        if d.get("key") != key:
            return None
        return GateResult.from_dict(d)
    except (OSError, ValueError, TypeError, KeyError):
        return None   # missing or unreadable: probe again


def _write_disk(res: GateResult) -> None:
    path = _disk_path(res.key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(res.to_dict(), f, indent=1)
        os.replace(tmp, path)   # atomic: a reader sees the old file or the whole new one
    except OSError:
        pass  # the disk cache is an optimisation; the in-memory result stands


# ------------------------------------------------------------------ the probe

_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena"]
_THINGS = ["apples", "books", "coins", "stamps", "marbles", "pencils", "shells", "cards", "eggs", "tickets"]
_PLACES = ["market", "library", "school", "garden", "station", "bakery"]

PROBE_AGENTS = {
    "gate_a": ("You answer questions in one short sentence.",
               "Question:\n{user_question}\n\nGive the answer in one sentence."),
    "gate_b": ("You check answers written by a colleague.",
               "The question was:\n{user_question}\n\nA colleague answered:\n{agent_gate_a_current}\n\n"
               "What is the final number?"),
}


def probe_questions(n: int, seed: int, long: bool) -> list[str]:
    """Generated arithmetic word problems; `long` ones carry one more sentence, so a
    pool filled with them has anchors at least as long as every short one."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(_NAMES, 2)
        thing, place = rng.choice(_THINGS), rng.choice(_PLACES)
        x, y = rng.randint(3, 60), rng.randint(2, 30)
        q = (f"{a} has {x} {thing}. At the {place}, {b} gives {a} {y} more {thing}. "
             f"How many {thing} does {a} have now?")
        if long:
            q = f"It is a busy morning in town and everyone is out. {q} Explain the steps briefly."
        out.append(q)
    return out


def _kv_error(reuse_cache, dense_cache, stop: int) -> float:
    """Relative Frobenius error of the reuse cache vs the dense one over positions
    [0, stop), layers >= 1 (layer 0 is exact by construction), K and V together."""
    rk, rv = reuse_cache.k[1:, :, :stop].float(), reuse_cache.v[1:, :, :stop].float()
    dk, dv = dense_cache.k[1:, :, :stop].float(), dense_cache.v[1:, :, :stop].float()
    num = torch.linalg.vector_norm(rk - dk) ** 2 + torch.linalg.vector_norm(rv - dv) ** 2
    den = torch.linalg.vector_norm(dk) ** 2 + torch.linalg.vector_norm(dv) ** 2
    return float(torch.sqrt(num / den.clamp_min(1e-30)))


def run_probe(engine, cfg: GateConfig, key: str = "") -> GateResult:
    """Runs the probe against `engine`'s model (a separate engine and pool) and judges it."""
    t0 = time.perf_counter()
    pc = engine.pool.config
    s = engine.spec
    pool = AnchorPool(PoolConfig(gamma=pc.gamma, tau=pc.tau, top_p=pc.top_p, distance=pc.distance,
                                 layers=s.num_layers, kv_heads=s.kv_heads, head_dim=s.head_dim))
    probe = KVCommEngine(engine.model, engine.tokenizer, pool=pool, lead_ins=engine.encoder.lead_ins,
                         recompute=engine.recompute, partial=engine.partial)
    for name, (system, template) in PROBE_AGENTS.items():
        probe.add_agent(name, system, template)

    # Warm-up: longer questions and replies than the probes', so anchors cover them.
    for q in probe_questions(cfg.warmup, cfg.seed + 1, long=True):
        probe.new_request()
        a = probe.call("gate_a", {"user_question": q}, max_new_tokens=cfg.reply_tokens + 4)
        probe.call("gate_b", {"user_question": q, "agent_gate_a_current": _slot_text(a.text)},
                   max_new_tokens=1)

    details, calls = [], 0
    for q in probe_questions(cfg.probes, cfg.seed + 2, long=False):
        probe.new_request()
        inputs = {"user_question": q}
        for agent in PROBE_AGENTS:
            kv = probe.call(agent, inputs, max_new_tokens=cfg.reply_tokens if agent == "gate_a" else 1,
                            keep_cache=True)
            dense = probe.call(agent, inputs, mode="dense", max_new_tokens=1, return_first_logits=True,
                               keep_cache=True)
            calls += 1
            if kv.path == "reuse":
                p = torch.softmax(dense.first_logits.float(), dim=-1)
                ratio = float(p[kv.first_token_id] / p.max())
                details.append({"agent": agent, "top1": kv.first_token_id == dense.first_token_id,
                                "dense_ratio": ratio, "agree": ratio >= cfg.tie_ratio,
                                "kv_error": _kv_error(kv.cache, dense.cache, kv.prompt_tokens - 1),
                                "prompt_tokens": kv.prompt_tokens})
            if agent == "gate_a":
                inputs = {**inputs, "agent_gate_a_current": _slot_text(kv.text)}
    return judge(details, calls, cfg, key, time.perf_counter() - t0)


def _slot_text(reply: str) -> str:
    # What a runtime would pass on: a reply that is empty still has to fill the slot.
    return reply if reply.strip() else "(no reply)"


def judge(details: list, calls: int, cfg: GateConfig, key: str, seconds: float) -> GateResult:
    """Turns per-call probe outcomes into the decision and its reason."""
    pairs = len(details)
    agreement = sum(d["agree"] for d in details) / pairs if pairs else None
    top1 = sum(d["top1"] for d in details) / pairs if pairs else None
    errors = [d["kv_error"] for d in details]
    kv_error = sum(errors) / pairs if pairs else None
    kv_max = max(errors) if errors else None
    where = f"on {pairs} probe call(s)"
    if pairs < cfg.min_pairs:
        allowed = False
        reason = (f"{REASON_PREFIX}: inconclusive, only {pairs} of {calls} probe calls took the reuse "
                  f"path (need {cfg.min_pairs})")
    elif agreement < cfg.threshold:
        allowed = False
        reason = f"{REASON_PREFIX}: agreement {agreement:.2f} < {cfg.threshold:.2f} {where}"
    elif cfg.max_kv_error is not None and kv_error > cfg.max_kv_error:
        allowed = False
        reason = f"{REASON_PREFIX}: KV error {kv_error:.3f} > {cfg.max_kv_error:.3f} {where}"
    else:
        allowed = True
        reason = (f"{REASON_PREFIX}: passed, agreement {agreement:.2f} >= {cfg.threshold:.2f}, "
                  f"KV error {kv_error:.3f} {where}")
    return GateResult(allowed=allowed, reason=reason, agreement=agreement, top1_agreement=top1,
                      pairs=pairs, calls=calls,
                      kv_error=kv_error, kv_error_max=kv_max, threshold=cfg.threshold,
                      max_kv_error=cfg.max_kv_error, seconds=seconds, key=key, details=details)


def check(engine, cfg: GateConfig) -> GateResult:
    """The gate's result for `engine`'s model: from memory, from disk, or a fresh probe."""
    key = model_key(engine.model, engine.spec, engine.pool.config, engine.encoder.lead_ins, cfg,
                    engine.recompute.describe())
    with _lock:   # one probe per model at a time; others wait for its result
        hit = _memory.get(key)
        if hit is not None:
            return _copy(hit, "memory")
        if cfg.disk_cache:
            hit = _read_disk(key)
            if hit is not None:
                _memory[key] = hit
                return _copy(hit, "disk")
        t0 = time.perf_counter()
        try:
            res = run_probe(engine, cfg, key)
        except Exception as e:  # a probe that cannot run is no evidence that reuse works
            first = str(e).splitlines()[0] if str(e) else ""
            res = GateResult(allowed=False, reason=f"{REASON_PREFIX}: probe failed: {type(e).__name__}: "
                             f"{first}"[:300], agreement=None, top1_agreement=None, pairs=0, calls=0,
                             kv_error=None, kv_error_max=None, threshold=cfg.threshold,
                             max_kv_error=cfg.max_kv_error, seconds=time.perf_counter() - t0, key=key)
            _memory[key] = res   # not written to disk: the failure may be transient
            return res
        _memory[key] = res
        if cfg.disk_cache:
            _write_disk(res)
        return res


def apply(engine, cfg: GateConfig) -> GateResult:
    """check(engine, cfg), then engine.refuse_reuse(the reason) when refused, or
    refuse_reuse(None) when allowed. Returns the result."""
    res = check(engine, cfg)
    engine.refuse_reuse(None if res.allowed else res.reason)
    return res


def _copy(res: GateResult, source: str) -> GateResult:
    d = res.to_dict()
    d.update(source=source, seconds=0.0)
    return GateResult.from_dict(d)
