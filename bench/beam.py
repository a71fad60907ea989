"""Beam search inside the running batch beside transformers `generate(num_beams=K)`, same prompts, one run.

    python -m bench.beam [--width 4] [--concurrency 8] [--requests 16] [--max-tokens 32]

tokenferry's engine (no HTTP) keeps `--concurrency` beam requests of width K running at once, each K rows of
the shared batch; transformers runs the same prompts one `generate` call at a time with an explicit
GenerationConfig (the same width, length_penalty 1, early_stopping false). Both return the K best sequences;
the tokens counted are those of the returned sequences (each up to and including its end-of-sequence).
Prints tokens/s of each side, the ratio (target: at least 3x), and how many requests returned the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch
from transformers import GenerationConfig

from models import LoadedModel, load
from server.engine import Engine
from server.request import SamplingParams
from server.scheduler import Budgets

QUESTIONS = [
    "What is the capital of Italy?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "Who wrote Hamlet?",
    "Give me a tip for sleeping better.",
    "What is 12 times 7?",
    "Describe a cat in one sentence.",
]


def prompts(loaded: LoadedModel, count: int) -> list[list[int]]:
    tokenizer = loaded.tokenizer
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
        for q in QUESTIONS
    ]
    # Past the questions, the same ones with a short preamble: other lengths, other answers.
    return [chats[i] if i < len(chats) else tokenizer.encode(f"Question {i}: ") + chats[i % len(chats)] for i in range(count)]


def run_engine(loaded: LoadedModel, jobs: list[list[int]], params: SamplingParams, concurrency: int) -> tuple[float, list]:
    async def main() -> tuple[float, list]:
        engine = Engine(loaded, Budgets(max_batch_size=64, max_batch_tokens=65536, max_prefill_tokens=8192, max_waiting=256))
        engine.start()
        gate = asyncio.Semaphore(concurrency)

        async def one(prompt: list[int]) -> list:
            async with gate:
                events = [event async for event in engine.submit(prompt, params)]
                return [list(b.token_ids) for b in events[-1].beams]

        try:
            started = time.perf_counter()
            results = await asyncio.gather(*(one(p) for p in jobs))
            return time.perf_counter() - started, results
        finally:
            await engine.shutdown(drain=False)

    return asyncio.run(main())


def run_transformers(loaded: LoadedModel, jobs: list[list[int]], width: int, max_tokens: int) -> tuple[float, list]:
    eos = list(loaded.info.eos_token_ids)
    config = GenerationConfig(
        num_beams=width, num_return_sequences=width, do_sample=False, max_new_tokens=max_tokens,
        length_penalty=1.0, early_stopping=False, eos_token_id=eos, pad_token_id=eos[0],
    )  # fmt: skip
    results = []
    started = time.perf_counter()
    for prompt in jobs:
        with torch.inference_mode():
            out = loaded.model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), generation_config=config
            )
        beams = []
        for sequence in out.tolist():
            tokens = sequence[len(prompt) :]
            beams.append(tokens[: tokens.index(eos[0]) + 1] if eos[0] in tokens else tokens)
        results.append(beams)
    return time.perf_counter() - started, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    loaded = load("default")
    jobs = prompts(loaded, args.requests)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=0.0, beam_width=args.width, beam_returns=args.width,
        length_penalty=1.0, early_stopping=False,
    )  # fmt: skip
    run_engine(loaded, jobs[:2], params, 2)  # warm-up
    engine_s, ours = run_engine(loaded, jobs, params, args.concurrency)
    hf_s, theirs = run_transformers(loaded, jobs, args.width, args.max_tokens)
    tokens = sum(len(t) for beams in ours for t in beams)
    hf_tokens = sum(len(t) for beams in theirs for t in beams)
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    print(f"beam width {args.width}, {args.requests} requests, {args.max_tokens} new tokens at most")
    print(f"  tokenferry, {args.concurrency} concurrent: {tokens} tokens in {engine_s:.1f} s = {tokens / engine_s:.1f} tok/s")
    print(f"  transformers generate, one at a time: {hf_tokens} tokens in {hf_s:.1f} s = {hf_tokens / hf_s:.1f} tok/s")
    print(f"  ratio {(tokens / engine_s) / (hf_tokens / hf_s):.2f}x; same sequences for {same} of {args.requests} requests")


if __name__ == "__main__":
    main()
