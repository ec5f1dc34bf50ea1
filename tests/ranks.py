"""Spawns a script as N gloo ranks for a test, without torchrun's elastic agent: the rank
processes themselves, on a loopback TCP store. A rank that hangs (a collective nobody else
makes) fails the test with every rank's Python stack, not a bare timeout.

    outs = run_ranks("worker.py", ["arg"], world=2)      # [stderr of rank 0, rank 1, ...]

The workers read RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as torchrun sets them, and should
init gloo with COLLECTIVE_TIMEOUT, so that a stuck collective raises on its own."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
COLLECTIVE_TIMEOUT = timedelta(seconds=120)

# runs the worker with faulthandler armed on SIGUSR1: the launcher asks a stuck rank for its stack
_BOOT = ("import faulthandler, runpy, signal, sys; faulthandler.register(signal.SIGUSR1); "
         "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, args, world: int = 2, timeout: float = 240, env=None) -> list:
    """Runs `script args` as `world` ranks; returns each rank's stderr. Fails (AssertionError)
    when a rank exits non-zero, or when the ranks are not done within `timeout` seconds: then
    with each rank's stack, asked for by SIGUSR1."""
    base = dict(os.environ if env is None else env, MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    procs, files = [], []
    for r in range(world):
        f = tempfile.TemporaryFile("w+")
        files.append(f)
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _BOOT, os.path.join(HERE, script), *map(str, args)],
            env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=f, stderr=subprocess.STDOUT,
            text=True))
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    hung = [r for r, p in enumerate(procs) if p.poll() is None]
    for r in hung:
        procs[r].send_signal(signal.SIGUSR1)
    if hung:
        time.sleep(2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    outs = []
    for f in files:
        f.seek(0)
        outs.append(f.read())
        f.close()
    if hung:
        raise AssertionError(f"ranks {hung} of {script} {args} still running after {timeout:.0f} "
                             "s; their stacks:\n" + "\n".join(
                                 f"--- rank {r} ---\n{outs[r][-6000:]}" for r in hung))
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} of {script} {args} exited {p.returncode}:\n" \
            f"{outs[r][-4000:]}"
    return outs
