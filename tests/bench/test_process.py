"""bench.process.ServerProcess, the way every test and benchmark starts a server: it dies with its starter."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

OWNER = """
import ctypes, sys
from pathlib import Path
from bench.process import ServerProcess
server = ServerProcess("--model", "tiny", "--log-level", "warning", log_dir=Path(sys.argv[1])).wait_ready()
print(server.process.pid, flush=True)
sys.stdin.readline()
ctypes.string_at(0)  # a segmentation fault: no cleanup runs, as when a kernel crashes the process
"""


def alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for whoever adopted it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("death", ["killed", "crashed"])
def test_a_server_dies_with_the_process_that_started_it(death: str, tmp_path: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        server = int(owner.stdout.readline())
        assert alive(server)
        if death == "killed":
            owner.kill()
        else:
            owner.stdin.write("\n")
            owner.stdin.flush()
        assert owner.wait(30) < 0  # died of a signal: SIGKILL or SIGSEGV
        deadline = time.monotonic() + 10
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(server), f"server {server} outlived the process that started it ({death})"
    finally:
        owner.kill()
