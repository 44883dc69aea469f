"""The KVCOMM engine on Hugging Face transformers.

    from kvcomm.engine import KVCommEngine, AgentCall
    eng = KVCommEngine(model, tokenizer)
    eng.add_agent("solver", "You solve math problems.", "Problem:\\n{user_question}\\n\\nSolve it.")
    eng.new_request()
    call = eng.call("solver", {"user_question": "What is 2 + 3?"})
"""
from .engine import MODES, AgentCall, KVCommEngine
from .template import Placeholder, Template, TemplateError, parse_template

__all__ = ["KVCommEngine", "AgentCall", "MODES", "TemplateError", "Template", "Placeholder", "parse_template"]
