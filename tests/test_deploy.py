"""`histofed deploy` pieces that need no running Flower: certificates, node keys, tracked
processes, command lines, and SuperNodes named by site in the handshake (issue 13)."""

import stat
import subprocess
import sys
import time

import pytest
from conftest import tiny_config_dict
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from test_flower_engine import LocalGrid, task_identity  # noqa: F401 (autouse fixture)

from histofed.config import config_from_dict, dump_toml
from histofed.engine import deploy, deploy_procs
from histofed.engine import flower as F
from histofed.engine.deploy_procs import DeployError
from histofed.engine.deploy_security import make_certs, make_node_key
from histofed.engine.loop import RunError


def test_certs_chain_to_the_ca_and_name_the_hosts(tmp_path):
    paths = make_certs(tmp_path, ["127.0.0.1", "coordinator.example.org"])
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (paths["key"], paths["ca_key"]):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError, match="already exist.*--overwrite"):
        make_certs(tmp_path)


def test_node_keys_are_what_flower_loads(tmp_path):
    priv, pub = make_node_key(tmp_path, "hospital-a")
    key = load_ssh_private_key(priv.read_bytes(), None)  # flower-supernode's loader
    public = load_ssh_public_key(pub.read_bytes())  # flwr supernode register's loader
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public.public_numbers() == key.public_key().public_numbers()
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError, match="registration is bound to it"):
        make_node_key(tmp_path, "hospital-a")


def test_processes_are_tracked_and_stopped_by_pid(tmp_path):
    env = deploy_procs.flower_env(tmp_path)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_HOME"] == str((tmp_path / "flwr-home").resolve())
    cmd = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    proc = deploy_procs.start_process(tmp_path, "sleeper", cmd, env)
    log = tmp_path / "logs" / "sleeper.log"
    try:
        assert deploy_procs.alive(proc)
        for _ in range(300):  # its output goes to its log
            if "up" in log.read_text():
                break
            time.sleep(0.1)
        with pytest.raises(DeployError, match="already running.*histofed deploy stop sleeper"):
            deploy_procs.start_process(tmp_path, "sleeper", cmd, env)
        assert [p.name for p in deploy_procs.processes(tmp_path)] == ["sleeper"]
        assert "stopped" in deploy_procs.stop_process(tmp_path, "sleeper")
        assert not deploy_procs.alive(proc) and deploy_procs.processes(tmp_path) == []
        assert "up" in log.read_text()
    finally:
        subprocess.run(["kill", "-9", str(proc.pid)], capture_output=True)


def test_a_reused_pid_is_not_signalled(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        fake = deploy_procs.Proc("superlink", other.pid, "123 flower-superlink --port 1", [], "")
        (tmp_path / "pids").mkdir()
        (tmp_path / "pids" / "superlink.json").write_text(
            __import__("json").dumps(fake.__dict__))
        assert "already exited" in deploy_procs.stop_process(tmp_path, "superlink")
        assert other.poll() is None  # the unrelated process lives on
    finally:
        other.kill()
        other.wait()


def test_tls_and_auth_are_the_default(tmp_path):
    with pytest.raises(DeployError, match="TLS is on by default.*--insecure"):
        deploy.start_superlink(tmp_path, certs=None)
    with pytest.raises(DeployError, match="missing .*ca.crt.*histofed deploy certs"):
        deploy.start_superlink(tmp_path, certs=tmp_path / "nowhere")
    with pytest.raises(DeployError, match="authentication needs TLS"):
        deploy.start_superlink(tmp_path, certs=None, insecure=True, auth=True)
    with pytest.raises(DeployError, match="--ca .*--key .*--insecure"):
        deploy.start_supernode(tmp_path, site="a", superlink="127.0.0.1:1")
    path = deploy.write_connection(tmp_path, "127.0.0.1:9", ca=tmp_path / "ca.crt",
                                   insecure=False)
    assert 'root-certificates = "' in path.read_text() and "insecure" not in path.read_text()


def test_run_command_passes_the_experiment_to_flwr_run(tmp_path):
    exp = tmp_path / "exp.toml"
    exp.write_text("x")
    cmd = deploy.run_command(exp, tmp_path / "run", round_timeout=30.0)
    assert cmd[1:3] == ["run", str(deploy.APP_DIR)] and cmd[3] == deploy.CONNECTION
    config = cmd[cmd.index("--run-config") + 1]
    assert f'histofed-config-file="{exp}"' in config and "round-timeout=30.0" in config
    resume = deploy.run_command(None, tmp_path / "run", resume=True)
    assert "resume=true" in resume[-1] and "histofed-config-file" not in resume[-1]
    with pytest.raises(DeployError, match="nope.toml does not exist"):
        deploy.run_command(tmp_path / "nope.toml", tmp_path / "run")


def test_the_flower_app_ships_inside_the_package():
    """`histofed deploy run` must find its Flower App in a wheel install, not only in a source
    checkout: the folder sits in the package and pyproject's package-data covers its files."""
    import fnmatch
    import tomllib
    from pathlib import Path

    import histofed

    package = Path(histofed.__file__).parent
    assert deploy.APP_DIR.parent == package and (deploy.APP_DIR / "pyproject.toml").is_file()
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["histofed"]
    for f in deploy.APP_DIR.iterdir():
        rel = f.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not in package-data"


def _site_grid(sites):
    grid = LocalGrid([None] * len(sites))
    for ctx, site in zip(grid.contexts.values(), sites):
        ctx.node_config["site"] = site
    return grid


def test_supernodes_named_by_site_get_their_clients():
    cfg = config_from_dict(tiny_config_dict("fedavg"), source="tiny")
    grid = _site_grid(["synthetic-2", "synthetic-0", "synthetic-1"])  # any order
    transport = F.FlowerTransport(grid, config_text=dump_toml(cfg.to_dict()), node_wait=0.0)
    assert transport.node_of == {0: 101, 1: 102, 2: 100}
    assert [c.name for c in transport.roster] == ["synthetic-0", "synthetic-1", "synthetic-2"]


def test_an_unknown_site_names_the_valid_ones():
    cfg = config_from_dict(tiny_config_dict("fedavg"), source="tiny")
    with pytest.raises(RunError, match="site='hospital-x' is not a client.*valid site names: "
                       "synthetic-0, synthetic-1, synthetic-2"):
        F.FlowerTransport(_site_grid(["synthetic-0", "hospital-x", "synthetic-2"]),
                          config_text=dump_toml(cfg.to_dict()), node_wait=0.0)


def test_the_superlink_keeps_its_state_on_disk_unless_asked_for_memory(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(deploy, "start_process", lambda state, name, cmd, env: started.append(
        cmd) or deploy_procs.Proc(name, 1, "", cmd, str(tmp_path / f"{name}.log")))
    monkeypatch.setattr(deploy, "_wait_for", lambda *a, **k: None)
    deploy.start_superlink(tmp_path, certs=None, insecure=True, auth=False)
    deploy.start_superlink(tmp_path, certs=None, insecure=True, auth=False, persist=False)
    on_disk, in_memory = started
    assert on_disk[on_disk.index("--database") + 1] == str((tmp_path / "superlink.db").resolve())
    assert "--database" not in in_memory  # Flower's in-memory state
    assert [a for a in on_disk if a != "--database" and "superlink.db" not in a] == in_memory
