"""The two modes of KVCommEngine.call, kept apart from the engine so the application
can name them without loading the model code (transformers)."""

KVCOMM = "kvcomm"   # decide per slot, reuse estimated KV where the pool can (docs/method.md, "The two paths")
DENSE = "dense"     # the baseline: full prefill of the whole prompt, no pool, no capture
MODES = (KVCOMM, DENSE)
