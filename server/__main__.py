"""Command line: `python -m server [serve] [flags]` serves; `python -m server generate "text"` streams one answer.

Every flag is also a TOKENFERRY_* environment variable. A bad value is a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from server import logs
from server.config import Config, add_arguments, from_namespace
from server.errors import TokenferryError
from server.request import SamplingParams

log = logging.getLogger("server")
COMMANDS = ("serve", "generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenferry", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API (the default)")
    add_arguments(serve)
    generate = commands.add_parser("generate", help="generate from one prompt and print the text as it streams")
    generate.add_argument("prompt", help="the user message (or raw text with --raw)")
    generate.add_argument("--max-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    generate.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    add_arguments(generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help"):
        args_list.insert(0, "serve")
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        config = from_namespace(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits with code 2
    logs.setup(config.log_level)
    if args.command == "generate":
        return asyncio.run(_generate(config, args))
    from server.app import serve  # FastAPI and uvicorn only when serving

    return serve(config)


async def _generate(config: Config, args: argparse.Namespace) -> int:
    from models import ModelLoadError, load
    from server.engine import Engine
    from server.prompt import encode_chat, encode_completion

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop=tuple(args.stop),
        )
        loaded = load(config.model, device=config.device, dtype=config.dtype, quantization=config.quantization)
    except (TokenferryError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.raw:
        prompt_ids = encode_completion(loaded.tokenizer, args.prompt)
    else:
        prompt_ids = encode_chat(loaded.tokenizer, [{"role": "user", "content": args.prompt}])
    engine = Engine(loaded, config.budgets, config.prefix_cache_bytes)
    engine.start()
    try:
        async for event in engine.submit(prompt_ids, params):
            print(event.text, end="", flush=True)
            if event.error:
                print(f"\nerror: {event.error}", file=sys.stderr)
                return 1
        print()
    except TokenferryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        await engine.shutdown(drain=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
