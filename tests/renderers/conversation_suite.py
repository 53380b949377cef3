"""The conversations renderer parity is checked on: system prompts, multi-turn, reasoning, tool use."""

from __future__ import annotations

import json


def call(name: str, **arguments) -> dict:
    return {
        "id": f"call_{name}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "What is 12+34?"}, {"role": "assistant", "content": "46"}],
    "system_multi_turn": [
        SYSTEM,
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "It is sunny, 21 degrees."},
        {"role": "user", "content": "héllo\nwörld ✓"},
        {"role": "assistant", "content": "multi\nline answer"},
    ],
    "reasoning_now": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add the units: 2+2=4"},
    ],
    "reasoning_in_history": [
        SYSTEM,
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "old thoughts"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning_content": "\nnew thoughts\n"},
    ],
    "inline_think_in_history": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nold answer"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ],
    "tool_call": [
        SYSTEM,
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris")]},
        {
            "role": "tool",
            "content": '{"temp": 21}',
            "tool_call_id": "call_get_weather",
            "name": "get_weather",
        },
        {"role": "assistant", "content": "It is 21 degrees."},
    ],
    "tool_calls_with_text_and_reasoning": [
        {"role": "user", "content": "Compare Paris and Rome."},
        {
            "role": "assistant",
            "content": "Let me check both.",
            "tool_calls": [
                call("get_weather", city="Paris"),
                call("get_weather", city="Rome", unit="celsius"),
            ],
        },
        {"role": "tool", "content": "21"},
        {"role": "tool", "content": "25"},
        {"role": "assistant", "content": "Rome is warmer.", "reasoning_content": "25 > 21"},
    ],
    "final_tool_call": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call("get_weather", city="Paris")]},
    ],
    "reasoning_then_tool_call": [
        {"role": "user", "content": "Weather in Rome?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I need the weather tool.",
            "tool_calls": [call("get_weather", city="Rome")],
        },
    ],
    "ends_with_user": [
        SYSTEM,
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "and 2+2?"},
    ],
    "consecutive_assistants": [
        {"role": "user", "content": "count"},
        {"role": "assistant", "content": "one"},
        {"role": "assistant", "content": "two"},
    ],
    "one_letter_messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ],
    "no_user": [SYSTEM, {"role": "assistant", "content": "Hello!"}],
}
