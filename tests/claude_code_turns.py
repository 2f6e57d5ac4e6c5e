"""Successive turns of one Claude Code conversation, as its messages bodies (for the billing-line tests).

Each turn's billing line carries what Claude Code 2.1.330 adds when it believes it talks to
Anthropic: the body hash (signed, see cmm/core/cch.py), the previous request's id, the prompt id
and counters; the conversation grows by a user/assistant exchange per turn.
"""

from __future__ import annotations

import json
from typing import Any

from cmm.core import cch

VERSION_FIELDS = "cc_version=2.1.330.a1b; cc_entrypoint=cli;"
GATEWAY_LINE = "x-anthropic-billing-header: " + VERSION_FIELDS
SYSTEM_PROMPT = "You are Claude Code, Anthropic's official CLI for Claude.\n\nBe concise: \"quoted\" \\ é 🙂"


def billing_line(turn: int) -> str:
    """The line as Claude Code writes it to Anthropic on ``turn`` (1-based); ``cch`` unsigned."""
    return (f"x-anthropic-billing-header: {VERSION_FIELDS} cch=00000; cc_prev_req=req_011CV{turn:019d}; "
            f"cc_prompt_id=4f1c7a3e-{turn:04d}-4000-8000-00000000c0de; cc_turn_origin=user; "
            f"cc_prompt_index={turn}; cc_turn_index={turn * 3 - 2};")


def turn_body(model: str, turn: int, filler: int = 2_000) -> bytes:
    """Turn ``turn`` of the conversation: Claude Code's key order and spacing, signed."""
    messages: list[dict[str, Any]] = []
    for n in range(1, turn + 1):
        messages.append({"role": "user", "content": [{"type": "text", "text": f"question {n}: " + "ü \"x\" " * filler}]})
        if n < turn:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": f"answer {n}"}]})
    payload = {
        "model": model,
        "messages": messages,
        "system": [{"type": "text", "text": billing_line(turn)},
                   {"type": "text", "text": SYSTEM_PROMPT, "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "Task", "description": "Launch an agent: x-anthropic-billing-header: cch=1;",
                   "input_schema": {"type": "object", "properties": {"model": {"type": "string"}}}}],
        "metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "s"})},
        "max_tokens": 32000,
        "thinking": {"budget_tokens": 31999, "type": "enabled", "display": "omitted"},
        "stream": True,
    }
    return cch.resign(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())
