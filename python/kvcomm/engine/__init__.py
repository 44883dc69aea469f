"""The KVCOMM engine on Hugging Face transformers.

    from kvcomm.engine import KVCommEngine, AgentCall
    eng = KVCommEngine(model, tokenizer)
    eng.add_agent("solver", "You solve math problems.", "Problem:\\n{user_question}\\n\\nSolve it.")
    eng.new_request()
    call = eng.call("solver", {"user_question": "What is 2 + 3?"})

KVCommEngine and AgentCall load on first use (they need transformers); the template
grammar (kvcomm.plan.template) and MODES import without it.
"""
from .modes import MODES
from ..plan.template import Placeholder, Template, TemplateError, parse_template

__all__ = ["KVCommEngine", "AgentCall", "MODES", "TemplateError", "Template", "Placeholder", "parse_template"]


def __getattr__(name: str):
    if name in ("KVCommEngine", "AgentCall"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
