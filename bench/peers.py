"""tokenferry beside its peers on the same model, chat streams, in one run (part of `make bench`).

    python -m bench.peers [--concurrency 1,8,32] [--max-tokens 64] [--rounds 2] [--modes int8,int4] [--no-build]

Servers, all started first, all on 127.0.0.1, all with this machine's thread count:
- tokenferry in float32 (the exact default), and in each `--quantization` mode of `--modes` that it accepts;
- llama.cpp: llama-cpp-python's server on the same GGUF file, `--interrupt_requests False` (else a new
  request interrupts the running one). Built once, with `-DGGML_NATIVE=ON`, into its own virtual
  environment under the tokenferry cache (about 20 minutes on 2 cores); never a dependency of the project;
- transformers' own server, `transformers serve --continuous-batching`, on the safetensors folder the
  default GGUF converts to.

Only the measured server runs: the others are stopped with SIGSTOP (an idle llama.cpp server beside a busy
one costs it up to 40% here). Levels alternate between servers (every server at c=1, then every server at
c=8, ...), for `--rounds` rounds, so that the machine's drift hits them all alike. Each request is one chat
turn, streamed, greedy, `max_tokens` new tokens. The report gives tok/s, TTFT and ITL percentiles, and the
ratios of tokenferry to each peer at each level.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.process import ServerProcess
from bench.serve import Level, chat_body, make_workload, requests_for, run_level, write
from models.loader import cache_root, converted_gguf, default_gguf

LLAMA_CPP = "llama-cpp-python[server]==0.3.36"
LLAMA_CPP_VENV = "llama-cpp-python-0.3.36"
CONTEXT = 4096


@dataclass
class Peer:
    label: str
    server: ServerProcess
    model: str | None = None  # the model id its requests name (None: the server's own)

    def pause(self) -> None:
        self.server.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.server.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a stopped process never sees SIGTERM
        self.server.terminate()


def llama_cpp_python(build: bool) -> Path | None:
    """The interpreter of the virtual environment holding llama-cpp-python's server, built on first use."""
    venv = cache_root() / "peers" / LLAMA_CPP_VENV
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True).returncode == 0:
        return python
    if not build:
        return None
    print(f"building {LLAMA_CPP} into {venv} (once; about 20 minutes on 2 cores)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", LLAMA_CPP], check=True, env=env)
    return python


def llama_cpp_launcher(python: Path) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        return [
            str(python), "-m", "llama_cpp.server", "--model", str(default_gguf()), "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(torch.get_num_threads()), "--n_ctx", str(CONTEXT),
            "--interrupt_requests", "False",
        ]  # fmt: skip

    return command


def transformers_launcher(folder: Path) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        executable = Path(sys.executable).parent / "transformers"
        return [str(executable), "serve", "--continuous-batching", "--host", "127.0.0.1", "--port", str(port), str(folder)]

    return command


def start(label: str, logs: Path, *flags: str, model: str | None = None, **options) -> Peer | None:
    """A started server, warmed by two requests and paused; None (and why) when it does not start."""
    try:
        server = ServerProcess(*flags, log_dir=logs, **options).wait_ready()
    except (RuntimeError, TimeoutError) as exc:
        print(f"  {label}: did not start, skipped ({str(exc).splitlines()[0]})", flush=True)
        return None
    peer = Peer(label, server, model)
    asyncio.run(run_level(server.url, model, make_workload(2, 8), 1, 2, "warm-up", shape=chat_body))
    peer.pause()
    print(f"  {label}: ready on {server.url}", flush=True)
    return peer


def start_llama_cpp(logs: Path, build: bool) -> Peer | None:
    """llama.cpp's server on the default GGUF, started as `start` starts a peer (built first if `build`); None,
    and why, when it is not built or does not start."""
    python = llama_cpp_python(build)
    if python is None:
        print("  llama.cpp: not built (bench.peers without --no-build builds it); skipped", flush=True)
        return None
    return start("llama.cpp", logs, launcher=llama_cpp_launcher(python), ready_path="/v1/models")


def merge_rounds(levels: list[Level]) -> list[Level]:
    """One level per server and concurrency: its rounds' samples together, over their summed time."""
    keys = dict.fromkeys((level.label, level.concurrency) for level in levels)
    merged = []
    for label, concurrency in keys:
        found = [l for l in levels if (l.label, l.concurrency) == (label, concurrency)]
        merged.append(Level(label, concurrency, sum(l.seconds for l in found), [s for l in found for s in l.samples]))
    return merged


def ratios(levels: list[Level]) -> str:
    """Each tokenferry mode against each other server at each level: tok/s ratio, and TTFT / ITL p50 of both."""
    by_key = {(level.label, level.concurrency): level for level in levels}
    labels = list(dict.fromkeys(level.label for level in levels))
    ours = [label for label in labels if label.startswith("tokenferry")]
    lines = ["", "## Ratios (tokenferry / other; rounds merged)", "",
             "| level | tokenferry | other | tok/s ratio | TTFT p50 (s) ours / other | ITL p50 (s) ours / other |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for concurrency in dict.fromkeys(level.concurrency for level in levels):
        for mine in ours:
            for other in labels:
                a, b = by_key.get((mine, concurrency)), by_key.get((other, concurrency))
                # Modes against float32 and against the peers; float32 against the peers only.
                if other == mine or (other in ours and other != "tokenferry float32"):
                    continue
                if a is None or b is None or not a.ok or not b.ok:
                    continue
                lines.append(
                    f"| c={concurrency} | {mine} | {other} | {a.tokens_per_s / b.tokens_per_s:.2f}x | "
                    f"{a.ttft(0.5):.3f} / {b.ttft(0.5):.3f} | {a.itl(0.5):.4f} / {b.itl(0.5):.4f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: 3 x concurrency, at least 8)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="times each level is measured, alternating servers")
    parser.add_argument("--modes", default="int8,int4", help="tokenferry --quantization modes besides float32")
    parser.add_argument("--no-build", action="store_true", help="skip llama.cpp unless it is already built")
    parser.add_argument("--out", type=Path, default=Path("bench/reports") / time.strftime("peers-%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    workload = make_workload(max(requests_for(c, args.requests) for c in concurrencies), args.max_tokens)
    logs = args.out / "logs"
    print(f"chat streams of {args.max_tokens} tokens, {torch.get_num_threads()} threads; reports in {args.out}", flush=True)

    candidates: list[Peer | None] = [start("tokenferry float32", logs, "--log-level", "warning")]
    for mode in filter(None, args.modes.split(",")):
        candidates.append(start(f"tokenferry {mode}", logs, "--log-level", "warning", "--quantization", mode))
    candidates.append(start_llama_cpp(logs, build=not args.no_build))
    folder = converted_gguf(default_gguf())
    candidates.append(
        start("transformers serve", logs, launcher=transformers_launcher(folder), ready_path="/health", model=str(folder))
    )
    peers = [peer for peer in candidates if peer is not None]

    levels: list[Level] = []
    try:
        for round_ in range(args.rounds):
            for concurrency in concurrencies:
                for peer in peers:
                    peer.resume()
                    try:
                        level = asyncio.run(run_level(
                            peer.server.url, peer.model, workload, concurrency,
                            requests_for(concurrency, args.requests), peer.label, shape=chat_body,
                        ))  # fmt: skip
                    finally:
                        peer.pause()
                    levels.append(level)
                    print(f"  round {round_ + 1} {peer.label} c={concurrency}: {level.tokens_per_s:.1f} tok/s, "
                          f"TTFT p50 {level.ttft(0.5):.3f} s, ITL p50 {level.itl(0.5):.4f} s p99 {level.itl(0.99):.4f} s, "
                          f"errors {level.errors}", flush=True)  # fmt: skip
    finally:
        for peer in peers:
            peer.stop()
    title = f"tokenferry and its peers, chat streams of {args.max_tokens} tokens, {args.rounds} alternating rounds"
    merged = merge_rounds(levels)
    path = write(merged, args.out, title, ratios(merged))
    print(path.read_text())


if __name__ == "__main__":
    main()
