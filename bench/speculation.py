"""Prompt-lookup speculation: one chat stream with `--speculative-tokens` against the same server without, in one run.

    python -m bench.speculation [--tokens 3,5] [--requests 6] [--max-tokens 128] [--rounds 2] [--flags ...] [--llama-cpp]

A server without lookup and one per draft length in `--tokens`, started first, the idle ones SIGSTOPped;
they alternate, workload by workload, for `--rounds` rounds. Two workloads: prompts whose answers copy
from the prompt (summaries, edits, extraction), where lookup pays, and open questions, where drafts are
rare and it should cost nothing. Prints tok/s, ITL and the ratio per workload and draft length, and for
each draft length the share of drafted tokens the model accepted (from /metrics). `--llama-cpp` puts
llama.cpp's own `llama-server` on the same GGUF in the rotation too (as bench.peers starts it; built by
`python -m bench.peers --peers llama.cpp --install-only` or a bench.peers run), for the ratio the
one-stream target is stated in.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bench.peers import Peer, merge_rounds, start, start_llama_cpp
from bench.process import metric_total
from bench.serve import Level, Workload, chat_body, run_level, write

ARTICLE = (
    "The city council met on Tuesday to discuss the new bridge across the river. The mayor said the bridge "
    "would cost forty million dollars and take three years to build. Several residents spoke against the "
    "plan, saying the money should go to schools instead. The council voted five to two to approve the first "
    "stage of the project, a study of the river bed that will take six months. Work on the study begins in "
    "March, and the engineers will report back to the council in September with a final design and budget."
)
COPYING = [
    f"Summarize this article:\n\n{ARTICLE}",
    f"Repeat the following text exactly:\n\n{ARTICLE}",
    f"Rewrite this article in the past tense:\n\n{ARTICLE}",
    f"List every number in this article with what it counts:\n\n{ARTICLE}",
    f"Who spoke against the plan, and what did the council decide?\n\n{ARTICLE}",
    f"Translate the first two sentences into simpler English:\n\n{ARTICLE}",
]
OPEN = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "What are the benefits of learning a second language?",
    "Describe a walk through a forest in autumn.",
    "Give advice to someone starting their first job.",
    "Why do cats purr?",
]


def accepted_share(peer: Peer) -> tuple[float, float]:
    text = peer.server.metrics()
    name = "tokenferry_speculative_tokens_total"
    return metric_total(text, name, result="drafted"), metric_total(text, name, result="accepted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="5", help="--speculative-tokens of the speculating servers, comma-separated")
    parser.add_argument("--requests", type=int, default=6, help="requests per workload and round, one at a time")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--flags", default="", help="more server flags for both, e.g. '--quantization int4'")
    parser.add_argument("--llama-cpp", action="store_true", help="also llama.cpp's llama-server, if bench.peers built it")
    parser.add_argument("--out", type=Path, default=Path("bench/reports") / time.strftime("speculation-%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    logs = args.out / "logs"
    flags = ["--log-level", "warning", *args.flags.split()]
    drafts = [int(k) for k in args.tokens.split(",")]
    plain = start("plain", logs, *flags)
    lookups = [start(f"lookup k={k}", logs, *flags, "--speculative-tokens", str(k)) for k in drafts]
    peers = [plain, *lookups]
    llama_cpp = start_llama_cpp(logs, build=False) if args.llama_cpp else None
    peers += [llama_cpp] if llama_cpp else []  # one that is not there is skipped, as in bench.peers
    if None in peers:
        for peer in peers:
            if peer is not None:
                peer.stop()
        raise SystemExit("a server did not start")
    workloads = {"copying": Workload(COPYING[: args.requests], args.max_tokens), "open": Workload(OPEN[: args.requests], args.max_tokens)}
    levels: list[Level] = []
    try:
        for round_ in range(args.rounds):
            for name, workload in workloads.items():
                for peer in peers:
                    peer.resume()
                    try:
                        level = asyncio.run(run_level(peer.server.url, None, workload, 1, len(workload.prompts),
                                                      f"{peer.label}, {name}", shape=chat_body))  # fmt: skip
                    finally:
                        peer.pause()
                    levels.append(level)
                    print(f"  round {round_ + 1} {level.label}: {level.tokens_per_s:.1f} tok/s, "
                          f"ITL p50 {level.itl(0.5):.4f} s", flush=True)  # fmt: skip
        shares = []
        for lookup in lookups:
            lookup.resume()
            shares.append(accepted_share(lookup))
    finally:
        for peer in peers:
            peer.stop()
    merged = {level.label: level for level in merge_rounds(levels)}
    lines = ["", "## Ratios (one stream, rounds merged; tok/s)", "",
             "| workload | k | plain | lookup | lookup / plain | llama.cpp | lookup / llama.cpp |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name in workloads:
        b = merged[f"plain, {name}"]
        c = merged[f"{llama_cpp.label}, {name}"] if llama_cpp else None
        for k, lookup in zip(drafts, lookups):
            a = merged[f"{lookup.label}, {name}"]
            theirs = f"{c.tokens_per_s:.1f} | {a.tokens_per_s / c.tokens_per_s:.2f}x" if c else "- | -"
            lines.append(f"| {name} | {k} | {b.tokens_per_s:.1f} | {a.tokens_per_s:.1f} | {a.tokens_per_s / b.tokens_per_s:.2f}x | {theirs} |")
    lines.append("")
    for k, (drafted, accepted) in zip(drafts, shares):
        share = accepted / drafted if drafted else 0.0
        lines.append(f"k={k}: drafted {drafted:.0f} tokens, accepted {accepted:.0f} ({share:.0%}).")
    path = write(list(merged.values()), args.out, f"prompt lookup k={args.tokens}, {args.max_tokens} new tokens", "\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
