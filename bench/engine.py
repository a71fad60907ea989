"""Engine-level benchmark: tokenferry's engine beside transformers `generate`, on the same prompts, in one run.

    python -m bench.engine [--requests 256] [--concurrency 1,8,32,64] [--static 8,32,64] [--prompt-tokens 8-64]
                           [--quantization none,int8,int4]

There are more requests than clients, so rows leave when done and newcomers fill their places. Every
request asks for its own max_tokens (16 to 128) and ignores EOS, so each makes exactly what it asked for. Only the tokens each request asked for count: a static batch runs until its longest request is done,
and what it makes past a row's own max_tokens is waste, not throughput. Prints tokens/s and ratios and
writes a Markdown report. With several `--quantization` modes, every mode is loaded at once and the modes
take turns at each concurrency level, so drift of a shared machine hits them alike; the report ends with a
table of tokens/s by mode and level, as ratios to the first mode.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.serve import percentile
from models import LoadedModel, decoder, load
from server.engine import Engine
from server.request import SamplingParams
from server.scheduler import Budgets

TEXT = (
    "A ferry crosses the bay every hour, carrying cars, bicycles, tourists with cameras and commuters with "
    "coffee. The captain knows the tides by heart and the deckhands know every passenger by name. On foggy "
    "mornings the horn sounds every two minutes and the gulls circle low over the wake. "
)


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class Measurement:
    name: str
    requests: int
    useful_tokens: int  # what the requests asked for
    made_tokens: int  # what the model computed, waste included
    seconds: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.seconds


def make_jobs(loaded: LoadedModel, n: int, seed: int = 0, min_prompt: int = 8, max_prompt: int = 256) -> list[Job]:
    """Mixed prompt lengths and max_tokens from 16 to 128, the same for every method."""
    rng = random.Random(seed)
    words = loaded.tokenizer.encode(TEXT * 40, add_special_tokens=False)
    jobs = []
    for _ in range(n):
        length = rng.randint(min_prompt, max_prompt)
        start = rng.randint(0, len(words) - length)
        jobs.append(Job(words[start : start + length], rng.randint(16, 128)))
    return jobs


def generate_static(loaded: LoadedModel, jobs: list[Job], batch_size: int) -> Measurement:
    """transformers `generate` on left-padded batches in arrival order; each batch runs to its longest request.

    On a thread of its own that ends before this returns, as `models.load` loads: a thread that ran PyTorch's
    kernels and lives on (this one, the main thread) keeps an OpenMP team, and libgomp then stops spinning
    between parallel regions, which made every later engine step slower (int4, one stream, in one hour: an ITL
    p50 of 47 ms with `generate` on the main thread, 28 to 32 ms with it here)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-generate") as pool:
        return pool.submit(_generate_static, loaded, jobs, batch_size).result()


def _generate_static(loaded: LoadedModel, jobs: list[Job], batch_size: int) -> Measurement:
    model, device = loaded.model, loaded.model.device
    made = 0
    started = time.perf_counter()
    for first in range(0, len(jobs), batch_size):
        batch = jobs[first : first + batch_size]
        width = max(len(j.prompt_ids) for j in batch)
        ids = torch.tensor([[0] * (width - len(j.prompt_ids)) + j.prompt_ids for j in batch], device=device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in batch], device=device)
        steps = max(j.max_tokens for j in batch)
        with torch.inference_mode():
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
        made += steps * len(batch)
    seconds = time.perf_counter() - started
    name = "generate, one at a time" if batch_size == 1 else f"generate, static batches of {batch_size}"
    return Measurement(name, len(jobs), sum(j.max_tokens for j in jobs), made, seconds)


def run_engine(loaded: LoadedModel, jobs: list[Job], concurrency: int, budgets: Budgets, label: str = "tokenferry") -> Measurement:
    """`concurrency` clients, each sending the next job as soon as its last one is done."""

    async def main() -> Measurement:
        engine = Engine(loaded, budgets)
        engine.start()
        queue = list(reversed(jobs))
        ttft: list[float] = []
        itl: list[float] = []

        async def client() -> None:
            while queue:
                job = queue.pop()
                params = SamplingParams(max_tokens=job.max_tokens, temperature=0.0, ignore_eos=True)
                sent = last = time.perf_counter()
                async for event in engine.submit(job.prompt_ids, params):
                    now = time.perf_counter()
                    if event.token_ids:
                        (ttft if last == sent else itl).append(now - last)
                        last = now

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        await engine.shutdown()
        useful = sum(j.max_tokens for j in jobs)
        return Measurement(f"{label}, concurrency {concurrency}", len(jobs), useful, useful, seconds, ttft, itl)

    return asyncio.run(main())


def report(results: list[Measurement], baseline: Measurement, static: dict[int, Measurement], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "| method | requests | useful tok/s | x one-at-a-time | x static batch | made / useful | TTFT p50 / p99 (s) | ITL p50 / p99 (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in results:
        concurrency = int(m.name.rsplit(" ", 1)[-1]) if m.name.startswith("tokenferry") else None
        versus_static = static.get(concurrency) if concurrency else None
        lines.append(
            f"| {m.name} | {m.requests} | {m.tokens_per_s:.1f} | {m.tokens_per_s / baseline.tokens_per_s:.2f} | "
            + (f"{m.tokens_per_s / versus_static.tokens_per_s:.2f}" if versus_static else "")
            + f" | {m.made_tokens / m.useful_tokens:.2f} | "
            + (f"{percentile(m.ttft, 0.5):.2f} / {percentile(m.ttft, 0.99):.2f}" if m.ttft else "")
            + " | "
            + (f"{percentile(m.itl, 0.5):.3f} / {percentile(m.itl, 0.99):.3f}" if m.itl else "")
            + " |"
        )
    return "\n".join(lines) + "\n"


def mode_table(by_mode: dict[tuple[str, int], Measurement], modes: list[str], concurrencies: list[int]) -> str:
    """tokens/s by quantization mode and concurrency, with each mode's ratio to the first."""
    first = modes[0]
    lines = [
        "| concurrency | " + " | ".join(f"{mode} tok/s" for mode in modes) + " | " + " | ".join(f"{m} / {first}" for m in modes[1:]) + " |",
        "| --- |" + " --- |" * (2 * len(modes) - 1),
    ]
    for c in concurrencies:
        rates = [by_mode[(mode, c)].tokens_per_s for mode in modes]
        lines.append(f"| {c} | " + " | ".join(f"{r:.1f}" for r in rates) + " | " + " | ".join(f"{r / rates[0]:.2f}" for r in rates[1:]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", default="none", help="comma-separated modes, measured in turns: none,int8,int4")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-tokens", default="8-64", help="range of prompt lengths, MIN-MAX (chat turns by default)")
    parser.add_argument("--alone-requests", type=int, default=8, help="requests timed one at a time (slow)")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--static", default="8,32,64", help="static batch sizes for transformers generate")
    parser.add_argument("--max-batch-tokens", type=int, default=65536)
    parser.add_argument("--max-prefill-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("bench/reports"))
    args = parser.parse_args()

    modes = [m for m in args.quantization.split(",") if m]
    models = {mode: load(args.model, device=args.device, dtype=args.dtype, quantization=mode) for mode in modes}
    # The static baselines run on the first mode's weights through transformers' forward: a Llama's fused
    # projections only run in models/decoder.py's, so that mode is loaded again with them apart.
    loaded = models[modes[0]]
    if decoder.fused(loaded.model):
        loaded = load(args.model, device=args.device, dtype=args.dtype, quantization=modes[0], fuse=False)
    low, high = (int(x) for x in args.prompt_tokens.split("-"))
    jobs = make_jobs(loaded, args.requests, min_prompt=low, max_prompt=high)
    alone_jobs = jobs[: args.alone_requests]
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    sizes = [int(s) for s in args.static.split(",") if s]
    budgets = Budgets(
        max_batch_size=max(concurrencies), max_batch_tokens=args.max_batch_tokens,
        max_prefill_tokens=args.max_prefill_tokens, max_waiting=len(jobs),
    )  # fmt: skip
    torch.manual_seed(0)
    for model in models.values():
        run_engine(model, jobs[:4], 4, budgets)  # warm-up

    print(f"{loaded.info.name} on {loaded.info.device} ({loaded.info.dtype}), {torch.get_num_threads()} threads; "
          f"{len(jobs)} requests, prompts {min(len(j.prompt_ids) for j in jobs)}-{max(len(j.prompt_ids) for j in jobs)} "
          f"tokens, max_tokens {min(j.max_tokens for j in jobs)}-{max(j.max_tokens for j in jobs)}", flush=True)
    print(f"quantization modes, taking turns at each level: {', '.join(modes)}", flush=True)
    baseline = generate_static(loaded, alone_jobs, 1)
    print(f"  {baseline.name}: {baseline.tokens_per_s:.1f} tok/s", flush=True)
    results = [baseline]
    static: dict[int, Measurement] = {}
    for size in sizes:
        static[size] = generate_static(loaded, jobs, size)
        results.append(static[size])
        print(f"  {static[size].name}: {static[size].tokens_per_s:.1f} tok/s", flush=True)
    by_mode: dict[tuple[str, int], Measurement] = {}
    for concurrency in concurrencies:
        for mode in modes:
            label = "tokenferry" if mode == "none" else f"tokenferry {mode}"
            m = run_engine(models[mode], alone_jobs if concurrency == 1 else jobs, concurrency, budgets, label)
            results.append(m)
            by_mode[(mode, concurrency)] = m
            ratio = f", {m.tokens_per_s / static[concurrency].tokens_per_s:.2f}x static" if concurrency in static else ""
            print(f"  {m.name}: {m.tokens_per_s:.1f} tok/s, {m.tokens_per_s / baseline.tokens_per_s:.2f}x one-at-a-time{ratio}", flush=True)

    title = f"Engine benchmark: {loaded.info.name}, {loaded.info.device}, {loaded.info.dtype}, {time.strftime('%Y-%m-%d %H:%M')}"
    text = report(results, baseline, static, title)
    if len(modes) > 1:
        text += "\n## Quantization modes, measured in turns\n\n" + mode_table(by_mode, modes, concurrencies)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if modes == ["none"] else "-" + "-".join(modes)
    path = args.out / f"engine-{loaded.info.device.split(':')[0]}-{loaded.info.dtype}{suffix}-prompts-{low}-{high}.md"
    path.write_text(text)
    print()
    print(text)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
