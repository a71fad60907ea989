"""How often a model calls a tool in `tool_choice: "auto"`, where it should and where it should not.

    python -m bench.tools [--flags '...'] [--max-tokens 160]

Starts a server (the default model unless `--flags` says otherwise), offers the same four tools with every
request, and asks 20 questions that one of them answers and 20 that none does, greedy, one at a time. Reports
the share of answers that call a tool in each group, how many calls named the right tool, and that every call's
arguments validate against its tool's schema (the grammar guarantees it; this checks it end to end).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import jsonschema
import openai

from bench.process import ServerProcess

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "calculate", "description": "Evaluate an arithmetic expression.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The current time in a time zone.",
     "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}},
    {"type": "function", "function": {"name": "search_web", "description": "Search the web for recent information.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
]  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CALL_FOR_A_TOOL = [
    ("What is the weather in Paris right now?", "get_weather"),
    ("Is it raining in London today?", "get_weather"),
    ("How warm is it in Tokyo at the moment?", "get_weather"),
    ("Tell me the current weather in Berlin.", "get_weather"),
    ("Will I need an umbrella in Seattle right now?", "get_weather"),
    ("What is 3847 times 2913?", "calculate"),
    ("Compute (1234 + 5678) / 3.", "calculate"),
    ("What is the square of 987?", "calculate"),
    ("Calculate 15% of 2480.", "calculate"),
    ("What is 98765 minus 12345?", "calculate"),
    ("What time is it in New York now?", "get_time"),
    ("Tell me the current time in UTC.", "get_time"),
    ("What's the local time in Sydney?", "get_time"),
    ("What time is it right now in Tokyo?", "get_time"),
    ("What is the current time in Berlin?", "get_time"),
    ("Search the web for today's top news headlines.", "search_web"),
    ("Find the latest release of Python on the web.", "search_web"),
    ("Look up who won yesterday's football match.", "search_web"),
    ("Search for the current price of bitcoin.", "search_web"),
    ("Find recent news about electric cars.", "search_web"),
]
NO_TOOL = [
    "Hi! How are you?",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Translate 'thank you' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "Give me a tip for sleeping better.",
    "Name a mammal that can fly.",
    "What color do you get by mixing blue and yellow?",
    "Tell me a short joke.",
    "What is a synonym for happy?",
    "Summarize: the cat sat on the mat all day.",
    "List three primary colors.",
    "How many legs does a spider have?",
    "What is the opposite of cold?",
    "Write one sentence about autumn.",
    "What does a baker do?",
    "Suggest a name for a pet goldfish.",
    "What is the plural of mouse?",
    "Say hello in French.",
]


def ask(client: openai.OpenAI, question: str, max_tokens: int) -> list:
    answer = client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": question}], tools=TOOLS, tool_choice="auto",
        temperature=0, max_tokens=max_tokens,
    )  # fmt: skip
    return list(answer.choices[0].message.tool_calls or [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flags", default="", help="server flags, as one string")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--out", type=Path, default=Path("bench/reports") / time.strftime("tools-%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    server = ServerProcess("--served-model-name", "bench", *shlex.split(args.flags), log_dir=args.out / "logs").wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        called, right, invalid = 0, 0, 0
        for question, tool in CALL_FOR_A_TOOL:
            calls = ask(client, question, args.max_tokens)
            called += bool(calls)
            right += any(c.function.name == tool for c in calls)
            for call in calls:
                try:
                    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
                except (ValueError, jsonschema.ValidationError):
                    invalid += 1
        spurious = 0
        for question in NO_TOOL:
            calls = ask(client, question, args.max_tokens)
            spurious += bool(calls)
    finally:
        server.terminate()
    lines = [
        f"# Tool calls in tool_choice auto: `{args.flags or 'default model'}`, greedy",
        "",
        "| questions | answers that call a tool | the right tool |",
        "| --- | --- | --- |",
        f"| {len(CALL_FOR_A_TOOL)} that call for one | {called} ({called / len(CALL_FOR_A_TOOL):.0%}) | {right} |",
        f"| {len(NO_TOOL)} that do not | {spurious} ({spurious / len(NO_TOOL):.0%}) | |",
        "",
        f"Calls whose arguments fail their tool's schema: {invalid}.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tools.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
