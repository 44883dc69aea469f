"""The fixed headers content is encoded behind (docs/method.md, "Terms" and "Details").

A question or tool result is encoded on its own behind a fixed header - the chat
template's opening up to the user message (BOS, and the default system prompt if the
template inserts one) followed by a lead-in that depends on the content's kind - and the
header tokens are dropped. Both backends build the header's token ids here, so a content's
base is encoded behind the same tokens whichever backend runs the model.

Lead-ins (documented defaults, configurable per kind):
    question  -> "The task is:\\n\\n"   ({user_question})
    condition -> "The tool result is:\\n\\n"   ({condition_<id>_current})
    reply     -> "Another agent replied:\\n\\n"   (an agent reply the backend did not
                 capture itself, e.g. text edited by the caller or a history note)
"""
from __future__ import annotations

from .template import chat_frame, tokenize

DEFAULT_LEAD_INS = {
    "question": "The task is:\n\n",
    "condition": "The tool result is:\n\n",
    "reply": "Another agent replied:\n\n",
}


def lead_ins(overrides: dict | None = None) -> dict[str, str]:
    """The default lead-ins with `overrides` (kind -> text) applied; an unknown kind is an error."""
    out = dict(DEFAULT_LEAD_INS)
    for kind, text in (overrides or {}).items():
        if kind not in DEFAULT_LEAD_INS:
            raise ValueError(f"lead-in for unknown content kind {kind!r} (kinds: {sorted(DEFAULT_LEAD_INS)})")
        if not isinstance(text, str):
            raise ValueError(f"lead-in for {kind!r} must be a string, got {type(text).__name__}")
        out[kind] = text
    return out


def header_ids(tokenizer, leads: dict[str, str]) -> dict[str, list[int]]:
    """Token ids of each kind's header: the chat opening of a user message (no system
    prompt of the agent's) followed by the kind's lead-in."""
    frame = chat_frame(tokenizer, None, generation_prompt=False)
    return {kind: tokenize(tokenizer, frame.prefix + lead, frame.add_special_tokens)[0]
            for kind, lead in leads.items()}
