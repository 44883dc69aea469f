"""Settings both backends (KVCommEngine and the vLLM connector) and the `kvcomm` command use
unless told otherwise. No heavy imports, so the command line can show them without loading
a model library."""

# The anchors a slot collects before it shares, when kvcomm makes its own pool. The pool's
# own default (PoolConfig) is the published method's 2; paired measurements on GSM8K and
# MMLU (docs/quality.md, "Fidelity") put 4 ahead: first-token KL 0.046 -> 0.033 and
# 0.074 -> 0.049, agreement 89 -> 91% and 83 -> 91%, while 6 and 8 leave most calls partial
# until the pool fills.
DEFAULT_MIN_ANCHORS = 4

# Whether a call with some slots that cannot be estimated still estimates the others
# (a partial call) instead of running fully dense.
DEFAULT_PARTIAL = True

# A content longer than its slot's pool covers shares the first tokens the pool covers when
# they are at least this fraction of it, and the rest is computed in context
# (kvcomm.plan.decide.decide_content); 0 keeps the published rule (such a content becomes an
# anchor and every agent that reads it computes all of it).
DEFAULT_HEAD_SHARE = 0.5

# The most anchors one estimate reads, nearest to the content first (0: all of a slot's
# candidates, as published). An estimate reads the base and the deltas of every anchor it
# uses, so without a limit a reuse call slows as its slot's pool grows (20 anchors per slot
# by default); docs/method.md, "Beyond the paper", has the measurements behind the value.
DEFAULT_ESTIMATE_ANCHORS = 8
