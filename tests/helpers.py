"""Shared by the end-to-end tests: run a script as a user would, alone or under torchrun."""
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def free_port():
    """A free TCP port for torchrun (--master_port=0 hangs in the c10d store with this torch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script, args, expect=0, torchrun=False):
    """Run `script` with `args` from the repo root; assert the exit code and return the process.
    Under torchrun each of the 2 ranks gets one thread: two ranks x two threads thrash 2 cores."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"] if torchrun else []
    cmd = [sys.executable] + launcher + [script] + [str(a) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS="1" if torchrun
               else os.environ.get("OMP_NUM_THREADS", "2"))
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == expect, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def assert_one_line_error(p, *needles):
    """The process failed with a single `error: ...` line on stderr that names every needle."""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
