"""`histofed deploy ...`: run histofed on a Flower deployment (SuperLink + one SuperNode per
site), on this machine for a trial or on one machine per hospital. See docs/deployment.md."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from histofed.cli.errors import friendly_errors

app = typer.Typer(
    help="Run histofed on a Flower deployment: a SuperLink (coordinator) and one SuperNode per "
    "hospital, TLS and SuperNode authentication on by default. Step by step: "
    "docs/deployment.md.",
    no_args_is_help=True)

StateDir = Annotated[Path, typer.Option(
    "--state-dir", help="Where PIDs, logs and Flower's files (FLWR_HOME) of this machine's "
    "deployment processes live.")]
DEFAULT_STATE = Path(".histofed-deploy")


def _deploy_errors(fn):
    """DeployError / FileExistsError -> `error: ...` and exit 2, like friendly_errors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from histofed.engine.deploy_procs import DeployError

        try:
            return fn(*args, **kwargs)
        except (DeployError, FileExistsError) as err:
            if os.environ.get("HISTOFED_DEBUG"):
                raise
            typer.echo(f"error: {err}", err=True)
            sys.exit(2)

    return friendly_errors(wrapper)


def _warn_insecure(insecure: bool) -> None:
    if insecure:
        from histofed.engine.deploy import INSECURE_WARNING

        typer.secho(INSECURE_WARNING, fg=typer.colors.YELLOW, err=True)


@app.command()
@_deploy_errors
def certs(
    out: Annotated[Path, typer.Argument(help="Folder for ca.crt, ca.key, server.pem, server.key.")],
    hosts: Annotated[list[str], typer.Option(
        "--hosts", help="Names / IP addresses the SuperNodes use to reach the SuperLink "
        "(repeat the option). Default: 127.0.0.1 and localhost.")] = [],  # noqa: B006
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    overwrite: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
) -> None:
    """Make a CA and a SuperLink server certificate (for trials; hospitals bring their own).

    \b
    Example:
      histofed deploy certs certs --hosts 127.0.0.1 --hosts localhost
      histofed deploy certs certs --hosts coordinator.example.org --hosts 10.0.0.5
    Copy certs/ca.crt to every site; server.key and ca.key stay on the coordinator.
    """
    from histofed.engine.deploy_security import DEFAULT_HOSTS, make_certs

    paths = make_certs(out, list(hosts) or list(DEFAULT_HOSTS), days=days, overwrite=overwrite)
    for what, path in paths.items():
        typer.echo(f"{what:7s} {path}")


@app.command()
@_deploy_errors
def keys(
    out: Annotated[Path, typer.Argument(help="Folder for <site>.key and <site>.pub.")],
    site: Annotated[list[str], typer.Option(help="Site name (repeat for several).")],
    overwrite: Annotated[bool, typer.Option(help="Replace existing keys.")] = False,
) -> None:
    """Make SuperNode authentication key pairs (ECDSA P-384, OpenSSH format), one per site.

    \b
    Example:
      histofed deploy keys keys --site synthetic-0 --site synthetic-1 --site synthetic-2
    <site>.key stays at the site (the supernode command's --key); the coordinator registers
    <site>.pub (the superlink command's --register, or the register command).
    """
    from histofed.engine.deploy_security import make_node_key

    for name in site:
        priv, pub = make_node_key(out, name, overwrite=overwrite)
        typer.echo(f"{name}: private {priv} (keep at the site), public {pub} (register it)")


@app.command()
@_deploy_errors
def superlink(
    certs: Annotated[Optional[Path], typer.Option(
        help="Folder with ca.crt, server.pem, server.key (made by the certs command).")] = None,
    register: Annotated[list[Path], typer.Option(
        help="A SuperNode public key (<site>.pub) to register once it runs (repeat).")] = [],  # noqa: B006
    host: Annotated[str, typer.Option(help="Listen address; 0.0.0.0 to accept other machines.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of Flower's Fleet + Control + Runtime API.")] = 8000,
    insecure: Annotated[bool, typer.Option(help="No TLS, no node authentication (one-machine trials only).")] = False,
    auth: Annotated[bool, typer.Option(help="SuperNode authentication (only registered keys may join).")] = True,
    persist: Annotated[bool, typer.Option(
        "--persist/--in-memory",
        help="Keep registrations, nodes and runs in <state-dir>/superlink.db across restarts. "
             "--in-memory: faster rounds (about half the time per round on a busy machine), "
             "but a restarted SuperLink forgets them: register the keys again and restart the "
             "SuperNodes.")] = True,
    state_dir: StateDir = DEFAULT_STATE,
) -> None:
    """Start the SuperLink (the coordinator's Flower server) in the background.

    \b
    Example:
      histofed deploy superlink --certs certs --register keys/synthetic-0.pub --register keys/synthetic-1.pub --register keys/synthetic-2.pub
      histofed deploy superlink --certs certs --host 0.0.0.0 --port 8000
    """
    from histofed.engine import deploy

    _warn_insecure(insecure)
    proc = deploy.start_superlink(state_dir, certs=certs, insecure=insecure,
                                  auth=auth and not insecure, host=host, port=port,
                                  persist=persist)
    typer.echo(f"superlink: PID {proc.pid}, listening on {host}:{port}, log {proc.log}")
    for key in register:
        typer.echo(f"registered {key}: node id {deploy.register(state_dir, key, site=key.stem)}")


@app.command(name="register")
@_deploy_errors
def register_cmd(
    public_key: Annotated[Path, typer.Argument(help="A site's <site>.pub.")],
    state_dir: StateDir = DEFAULT_STATE,
) -> None:
    """Register a SuperNode's public key with the running SuperLink (coordinator side).

    \b
    Example:
      histofed deploy register keys/synthetic-0.pub
    """
    from histofed.engine.deploy import register

    typer.echo(f"registered {public_key}: node id {register(state_dir, public_key, site=public_key.stem)}")


@app.command()
@_deploy_errors
def supernode(
    site: Annotated[str, typer.Option(help="This site's client name in the federation.")],
    superlink: Annotated[str, typer.Option(help="The SuperLink's HOST:PORT.")],
    data_root: Annotated[Optional[Path], typer.Option(help="This site's data (omit for synthetic federations).")] = None,
    ca: Annotated[Optional[Path], typer.Option(help="The SuperLink's ca.crt.")] = None,
    key: Annotated[Optional[Path], typer.Option(help="This site's private key (<site>.key).")] = None,
    runtime_port: Annotated[int, typer.Option(
        help="Loopback port of the SuperNode's Runtime API (one per SuperNode on a machine).")] = 9094,
    insecure: Annotated[bool, typer.Option(help="No TLS, no node authentication (one-machine trials only).")] = False,
    state_dir: StateDir = DEFAULT_STATE,
) -> None:
    """Start this site's SuperNode and its long-lived ClientApp process in the background.

    \b
    Example:
      histofed deploy supernode --site synthetic-0 --superlink 127.0.0.1:8000 --ca certs/ca.crt --key keys/synthetic-0.key --runtime-port 9094
      histofed deploy supernode --site hospital-a --superlink coordinator.example.org:8000 --data-root /data/hospital-a --ca ca.crt --key hospital-a.key
    """
    from histofed.engine.deploy import start_supernode

    _warn_insecure(insecure)
    for proc in start_supernode(state_dir, site=site, superlink=superlink, data_root=data_root,
                                ca=ca, key=key, insecure=insecure, runtime_port=runtime_port):
        typer.echo(f"{proc.name}: PID {proc.pid}, log {proc.log}")


@app.command(name="run")
@_deploy_errors
def run_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="Experiment TOML (the same as for histofed run).")] = None,
    run_dir: Annotated[Path, typer.Option(help="Run directory on the coordinator (new, unless --resume).")] = Path("runs/deployment"),
    resume: Annotated[bool, typer.Option(help="Continue --run-dir from its last checkpoint, with its own config.toml.")] = False,
    round_timeout: Annotated[float, typer.Option(help="Seconds to wait for one batch of replies (0 = no limit).")] = 0.0,
    node_wait: Annotated[float, typer.Option(help="Seconds to wait for the SuperNodes to connect.")] = 300.0,
    app_dir: Annotated[Optional[Path], typer.Option("--app", help="The Flower App folder (default: the one installed with histofed, histofed/flower_app).")] = None,
    state_dir: StateDir = DEFAULT_STATE,
) -> None:
    """Run an experiment on the deployment (wraps flwr run) and wait until it ends.

    \b
    Example:
      histofed deploy run configs/fedavg-nuclei.toml --run-dir runs/fedavg-deployed --round-timeout 600
      histofed deploy run --run-dir runs/fedavg-deployed --resume
    """
    from histofed.engine.deploy import run

    status = run(state_dir, config, run_dir, echo=typer.echo, app=app_dir, resume=resume,
                 round_timeout=round_timeout, node_wait=node_wait)
    typer.echo(f"run {status}; run directory {run_dir.resolve()}")


@app.command()
@_deploy_errors
def stop(
    names: Annotated[list[str], typer.Argument(help="Processes to stop (default: all).")] = None,  # noqa: B006
    state_dir: StateDir = DEFAULT_STATE,
) -> None:
    """Stop deployment processes started from this state dir (by PID, checked first).

    \b
    Example:
      histofed deploy stop
      histofed deploy stop supernode-synthetic-0 clientapp-synthetic-0
    """
    from histofed.engine.deploy_procs import stop_all, stop_process

    for line in ([stop_process(state_dir, n) for n in names] if names else stop_all(state_dir)):
        typer.echo(line)


@app.command()
@_deploy_errors
def status(state_dir: StateDir = DEFAULT_STATE) -> None:
    """List the deployment processes of this state dir: running or exited, PID, log.

    \b
    Example:
      histofed deploy status --state-dir .histofed-deploy
    """
    from histofed.engine.deploy_procs import alive, processes

    procs = processes(state_dir)
    if not procs:
        typer.echo(f"no deployment processes recorded in {state_dir}")
    for proc in procs:
        typer.echo(f"{proc.name:28s} {'running' if alive(proc) else 'exited ':7s} "
                   f"PID {proc.pid:<8d} log {proc.log}")
