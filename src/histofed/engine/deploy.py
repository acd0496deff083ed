"""``histofed deploy``: a Flower deployment (SuperLink, one SuperNode per site, the run).

Everything runs through Flower 1.42's own programs; this module builds their command lines.
Facts it relies on, read in Flower 1.42's source (``flwr/superlink/cli/flower_superlink.py``,
``flwr/supernode/cli/flower_supernode.py``, ``flwr/cli/supernode/register.py``,
``flwr/cli/flower_config.py``):

* ``flower-superlink`` serves the Fleet, Control and Runtime (ServerAppIo) APIs over HTTPS on
  one port (``--host``/``--port``, default 127.0.0.1:8000), TLS from ``--ssl-certfile``,
  ``--ssl-keyfile``, ``--ssl-ca-certfile``. ``--enable-supernode-auth`` (TLS required) admits
  only SuperNodes whose public key was registered with ``flwr supernode register``; others
  fail to activate (the SuperNode exits with code 305). ``--database FILE`` keeps the
  registrations across a SuperLink restart (SQLite through SQLAlchemy: slower on every
  request than the in-memory default, which ``persist=False`` keeps).
* ``flower-supernode --superlink HOST:PORT --root-certificates CA
  --auth-supernode-private-key KEY --node-config "site=NAME data-root=DIR"``; its Runtime API
  (for its ClientApp) listens on ``--host``/``--port`` (default 127.0.0.1:9094). With
  ``--isolation process`` it launches no ClientApp process itself: ``histofed deploy
  supernode`` starts one long-lived ``histofed.engine.deploy_worker`` next to it, and runs
  the SuperNode as ``python -m histofed.flower_patches`` (Flower's own entry point, with
  three fixed waits of its message loop shortened; see that module).
* the ``flwr`` CLI reads SuperLink connections from ``$FLWR_HOME/config.toml``
  (``[superlink.NAME] address, root-certificates | insecure``); every child here has
  ``FLWR_HOME = <state>/flwr-home``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from histofed.engine.deploy_procs import (
    DeployError,
    Proc,
    _port_open,
    _tail,
    _wait_for,
    flower_env,
    program,
    start_process,
    stop_process,
)
from histofed.engine.deploy_security import CA_CERT, SERVER_CERT, SERVER_KEY

CONNECTION = "histofed"  # the flwr CLI's name for our SuperLink
SUPERLINK_PORT = 8000  # flwr.supercore.constant.SUPERLINK_UVICORN_DEFAULT_PORT
NODE_RUNTIME_PORT = 9094  # flwr.supercore.constant.SUPERNODE_UVICORN_DEFAULT_PORT
APP_DIR = Path(__file__).resolve().parents[1] / "flower_app"  # package data: works from a wheel too
INSECURE_WARNING = ("WARNING: --insecure: TLS is off and SuperNodes are not authenticated; "
                    "anyone who can reach the port can read the model updates and join the "
                    "federation. Use it only to try histofed on one machine.")


def _toml_str(value: str) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_connection(state: Path, address: str, *, ca: Path | None, insecure: bool) -> Path:
    """``$FLWR_HOME/config.toml`` with the ``histofed`` SuperLink connection (the default)."""
    home = Path(state) / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f"default = {_toml_str(CONNECTION)}", "",
             f"[superlink.{CONNECTION}]", f"address = {_toml_str(address)}"]
    lines.append("insecure = true" if insecure
                 else f"root-certificates = {_toml_str(Path(ca).resolve())}")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _certs(certs: Path | None, insecure: bool, *files: str) -> list[Path]:
    if insecure:
        return []
    if certs is None:
        raise DeployError("TLS is on by default: give --certs DIR (made by histofed deploy "
                          "certs DIR, or your own ca.crt, server.pem, server.key), or ask for "
                          "--insecure explicitly")
    paths = [Path(certs) / f for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DeployError(f"missing {', '.join(missing)}; make them with histofed deploy certs "
                          f"{certs} (or copy your CA's files there under these names)")
    return paths


def start_superlink(state: Path, *, certs: Path | None, insecure: bool = False,
                    auth: bool = True, host: str = "127.0.0.1", port: int = SUPERLINK_PORT,
                    address: str | None = None, persist: bool = True,
                    timeout: float = 60.0) -> Proc:
    """Start ``flower-superlink`` and point the ``flwr`` CLI at it; returns the process.

    Args:
        state: state dir (PIDs, logs, FLWR_HOME, the SuperLink's database).
        certs: folder with ca.crt, server.pem, server.key (None only with ``insecure``).
        insecure: plain HTTP, no node authentication (must be asked for).
        auth: SuperNode authentication (only registered keys may join; needs TLS).
        host, port: where it listens (0.0.0.0 to accept other machines).
        address: how ``flwr`` reaches it (default host:port, 127.0.0.1 for 0.0.0.0).
        persist: keep the SuperLink's state (registrations, nodes, runs) in
            ``<state>/superlink.db`` so it survives a restart; False: Flower's in-memory
            state, which a restart forgets, but every poll, heartbeat and message costs less
            (Flower 1.42's SQL state: about 2x the time per round of the localhost demo on a
            loaded 2-core machine, benchmarks/results/deploy.md).

    Raises:
        DeployError: missing certificates, auth without TLS, or it exits / does not listen.
    """
    if insecure and auth:
        raise DeployError("SuperNode authentication needs TLS; with --insecure also give "
                          "--no-auth")
    ca, cert, key = _certs(certs, insecure, CA_CERT, SERVER_CERT, SERVER_KEY) or (None,) * 3
    cmd = [program("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    cmd += ["--database", str((Path(state) / "superlink.db").resolve())] if persist else []
    cmd += ["--insecure"] if insecure else ["--ssl-ca-certfile", str(ca), "--ssl-certfile",
                                            str(cert), "--ssl-keyfile", str(key)]
    cmd += ["--enable-supernode-auth"] if auth else []
    Path(state).mkdir(parents=True, exist_ok=True)
    proc = start_process(state, "superlink", cmd, flower_env(state))
    reach = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    write_connection(state, address or f"{reach}:{port}", ca=ca, insecure=insecure)
    _wait_for(proc, lambda: _port_open(reach, port), f"listen on {reach}:{port}", timeout)
    return proc


def flwr(state: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI with this state dir's FLWR_HOME; output captured."""
    return subprocess.run([program("flwr"), *args], capture_output=True, text=True,
                          env=flower_env(state), timeout=timeout)


def register(state: Path, public_key: Path, *, site: str | None = None) -> int:
    """Register a SuperNode's public key with the SuperLink; its node id.

    Raises:
        DeployError: the key file is missing or invalid, or the SuperLink refused it.
    """
    args = ["supernode", "register", str(public_key), CONNECTION, "--format", "json"]
    args += ["--name", site] if site else []
    done = flwr(state, *args)
    match = re.search(r'"node-id":\s*(\d+)', done.stdout)
    if done.returncode or not match:
        raise DeployError(f"registering {public_key} failed (flwr exit {done.returncode}):\n"
                          f"{(done.stdout + done.stderr).strip()[-2000:]}")
    return int(match.group(1))


def start_supernode(state: Path, *, site: str, superlink: str, data_root: Path | None = None,
                    ca: Path | None = None, key: Path | None = None, insecure: bool = False,
                    runtime_port: int = NODE_RUNTIME_PORT, node_config: str = "",
                    isolation: str = "process", timeout: float = 120.0) -> list[Proc]:
    """Start one site's ``flower-supernode --isolation process`` and its long-lived ClientApp
    worker; returns both once the SuperLink has accepted the node.

    ``isolation="subprocess"`` is Flower's default instead (a new ``flwr-clientapp`` process
    per message, no worker); kept to measure what the worker saves.

    Raises:
        DeployError: missing CA/key (unless insecure), or the SuperLink refused the node
            (e.g. its key is not registered) or it did not connect within ``timeout``.
    """
    if not insecure and (ca is None or key is None):
        raise DeployError("TLS and node authentication are on by default: give --ca (the "
                          "SuperLink's ca.crt) and --key (this site's key from histofed deploy "
                          "keys), or ask for --insecure explicitly")
    for path in [p for p in (ca, key) if p is not None]:
        if not Path(path).is_file():
            raise DeployError(f"{path} does not exist")
    config = f"site={_toml_str(site)}"
    if data_root is not None:
        config += f" data-root={_toml_str(Path(data_root).resolve())}"
    config += f" {node_config}" if node_config else ""
    # Flower's flower-supernode with shorter fixed waits (histofed/flower_patches.py)
    cmd = [sys.executable, "-m", "histofed.flower_patches", "--superlink", superlink,
           "--isolation", isolation, "--host", "127.0.0.1", "--port", str(runtime_port),
           "--node-config", config, "--max-retries", "10"]
    cmd += ["--insecure"] if insecure else ["--root-certificates", str(Path(ca).resolve()),
                                            "--auth-supernode-private-key",
                                            str(Path(key).resolve())]
    env = flower_env(state)
    procs = [start_process(state, f"supernode-{site}", cmd, env)]
    if isolation == "process":
        procs.append(start_process(state, f"clientapp-{site}", [
            sys.executable, "-m", "histofed.engine.deploy_worker", "--runtime-api-address",
            f"127.0.0.1:{runtime_port}", "--insecure", "--parent-pid", str(procs[0].pid)], env))
    log = Path(procs[0].log)
    try:
        _wait_for(procs[0], lambda: "SuperNode ID:" in log.read_text(errors="replace"),
                  "connect to the SuperLink (is its key registered?)", timeout)
    except DeployError:
        for proc in reversed(procs):
            stop_process(state, proc.name)
        raise
    return procs


def run_command(config: Path | None, run_dir: Path, *, app: Path | None = None,
                resume: bool = False, round_timeout: float = 0.0, node_wait: float = 300.0,
                extra: str = "") -> list[str]:
    """The ``flwr run`` command line for an experiment TOML (the same as a simulation's)."""
    app = Path(app) if app else APP_DIR
    if not (app / "pyproject.toml").is_file():
        raise DeployError(f"no Flower App at {app}; give --app PATH/TO/an/app "
                          "(histofed ships one in histofed/flower_app; is the install complete?)")
    if config is not None and not resume and not Path(config).is_file():
        raise DeployError(f"experiment config {config} does not exist")
    pairs = [f"run-dir={_toml_str(Path(run_dir).resolve())}", f"round-timeout={round_timeout!r}",
             f"node-wait={node_wait!r}", f"resume={'true' if resume else 'false'}"]
    if config is not None and not resume:
        pairs.insert(0, f"histofed-config-file={_toml_str(Path(config).resolve())}")
    pairs += [extra] if extra else []
    return [program("flwr"), "run", str(app.resolve()), CONNECTION, "--stream",
            "--run-config", " ".join(pairs)]


def run(state: Path, config: Path | None, run_dir: Path, *, echo=None, **kwargs) -> str:
    """Submit the run, stream its log until it ends; its final Flower status.

    Raises:
        DeployError: ``flwr run`` failed or the run did not finish as completed.
    """
    cmd = run_command(config, run_dir, **kwargs)
    log = Path(state) / "logs" / "run.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    run_id, lines = None, []
    with open(log, "a") as out, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=flower_env(state)) as child:
        for line in child.stdout:
            out.write(line)
            out.flush()
            lines.append(line)
            if echo:
                echo(line.rstrip("\n"))
            found = re.search(r"started run (\d+)", line)
            run_id = run_id or (found and found.group(1))
    if child.returncode or run_id is None:
        raise DeployError(f"flwr run failed (exit {child.returncode}):\n{''.join(lines[-20:])}")
    status = run_status(state, run_id)
    if status != "finished:completed":
        raise DeployError(f"run {run_id} ended as {status!r}; see {log} and "
                          f"{Path(state) / 'logs'}:\n{_tail(log)}")
    return status


def run_status(state: Path, run_id: str) -> str:
    """Flower's status of one run (e.g. ``finished:completed``), from ``flwr ls``."""
    done = flwr(state, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
    try:
        runs = json.loads(done.stdout[done.stdout.index("{"):])["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError):
        return f"unknown ({(done.stdout + done.stderr).strip()[-300:]})"
