"""Processes of a deployment: started in their own session, tracked by PID, stopped by PID.

Each child gets the Flower environment (no runtime ``uv`` installs, no telemetry, no update
check, ``FLWR_HOME`` inside the state dir so nothing is written to the user's home), its
output goes to ``<state>/logs/<name>.log`` and its PID to ``<state>/pids/<name>.json``.
Stopping first checks that the PID is still the process that was started (its start time
and command line), then signals its process group (the SuperLink's ServerApp launcher, a
SuperNode's ClientApp processes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_STATE = Path(".histofed-deploy")
FLOWER_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
              "FLWR_DISABLE_UPDATE_CHECK": "1"}


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and how to fix it."""


# ---- environment and programs -------------------------------------------------------------
def flower_env(state: Path) -> dict[str, str]:
    """The environment of every child: the caller's, Flower's switches off, FLWR_HOME here."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str((Path(state) / "flwr-home").resolve())
    # FLWR_SUPEREXEC_TASK_POLL_INTERVAL stays Flower's (1 s): histofed set 0.1 s, which made
    # the SuperLink's ServerApp launcher ask 10 times a second for the whole run, each a
    # request through the SuperLink's SQL state, to start the ServerApp ~0.45 s sooner once.
    # Two A/B runs on the loaded 2-core machine: 6.4 vs 5.6 and 10.6 vs 7.0 s/round.
    env["PYTHONUNBUFFERED"] = "1"
    # Flower starts its helpers (flower-superexec, flwr-serverapp) by name: this Python's first
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def program(name: str) -> str:
    """A Flower program from this Python's environment (then from PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found next to {sys.executable} or on PATH; install "
                          "histofed (it brings flwr) in this environment")
    return found


# ---- tracked processes --------------------------------------------------------------------
@dataclass
class Proc:
    """A process this state dir started: name, PID and what identifies it."""

    name: str
    pid: int
    identity: str  # start time + command line, read back before signalling
    cmd: list[str]
    log: str


def _identity(pid: int) -> str | None:
    """Start time and command line of ``pid`` (None if gone): a reused PID differs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        start = stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks
        return start + " " + Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc (macOS): ask ps
        out = subprocess.run(["ps", "-o", "lstart=", "-o", "command=", "-p", str(pid)],
                             capture_output=True, text=True).stdout.strip()
        return out or None


def alive(proc: Proc) -> bool:
    """True if ``proc.pid`` is still the process we started (not a zombie, not reused)."""
    try:
        if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except OSError:
        pass
    return _identity(proc.pid) == proc.identity


def _pid_file(state: Path, name: str) -> Path:
    return Path(state) / "pids" / f"{name}.json"


def start_process(state: Path, name: str, cmd: list[str], env: dict[str, str]) -> Proc:
    """Start ``cmd`` in its own session, output to ``logs/<name>.log``, PID recorded.

    Raises:
        DeployError: a process of that name from this state dir is still running.
    """
    state = Path(state)
    old = load_process(state, name)
    if old is not None and alive(old):
        raise DeployError(f"{name} is already running (PID {old.pid}); stop it first with "
                          f"histofed deploy stop {name} --state-dir {state}")
    (state / "logs").mkdir(parents=True, exist_ok=True)
    (state / "pids").mkdir(parents=True, exist_ok=True)
    log = state / "logs" / f"{name}.log"
    with open(log, "ab") as out:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
    identity = None
    for _ in range(50):  # /proc shows the new command line once exec is done
        identity = _identity(child.pid)
        if identity and Path(cmd[0]).name in identity:
            break
        time.sleep(0.02)
    proc = Proc(name, child.pid, identity or "", list(cmd), str(log))
    _pid_file(state, name).write_text(json.dumps(asdict(proc), indent=2))
    return proc


def load_process(state: Path, name: str) -> Proc | None:
    path = _pid_file(state, name)
    return Proc(**json.loads(path.read_text())) if path.exists() else None


def processes(state: Path) -> list[Proc]:
    """Every process this state dir recorded, running or not."""
    return [Proc(**json.loads(p.read_text()))
            for p in sorted((Path(state) / "pids").glob("*.json"))]


def stop_process(state: Path, name: str, *, grace: float = 10.0) -> str:
    """Stop ``name`` (SIGTERM to its process group, SIGKILL after ``grace`` s); a summary.

    Its PID is signalled only if it is still the process we started, so a PID reused by
    another program is left alone. The PID file is removed either way.
    """
    proc = load_process(state, name)
    if proc is None:
        return f"{name}: not started from {state}"
    _pid_file(state, name).unlink()
    if not alive(proc):
        return f"{name}: PID {proc.pid} had already exited"
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # its session: SuperExec, ServerApp, ClientApps
    except ProcessLookupError:
        return f"{name}: PID {proc.pid} had already exited"
    deadline = time.monotonic() + grace
    while alive(proc) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(proc):
        os.killpg(proc.pid, signal.SIGKILL)
        return f"{name}: PID {proc.pid} killed (did not stop within {grace:.0f} s)"
    try:  # children left in its group (e.g. a ClientApp process)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return f"{name}: PID {proc.pid} stopped"


def stop_all(state: Path) -> list[str]:
    """Stop every recorded process: the run and SuperNodes first, the SuperLink last."""
    names = [p.name for p in processes(state)]
    names.sort(key=lambda n: (n == "superlink", n))
    return [stop_process(state, n) for n in names]


def _tail(path: str | Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_for(proc: Proc, ready, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if not alive(proc):
            raise DeployError(f"{proc.name} exited before {what}; its log {proc.log} ends "
                              f"with:\n{_tail(proc.log)}")
        time.sleep(0.2)
    raise DeployError(f"{proc.name} did not {what} within {timeout:.0f} s; see {proc.log}:\n"
                      f"{_tail(proc.log)}")


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (bind port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
