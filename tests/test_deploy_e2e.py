"""Issue 13's "done when": a real Flower deployment on 127.0.0.1 started by `histofed deploy`
code, with TLS and SuperNode authentication: SuperLink + 3 SuperNodes (long-lived ClientApp
workers), 3 rounds of FedAvg and 3 of FedProx on the synthetic federation, the same weights
and metrics as the in-process engine; an unregistered and a keyless SuperNode are refused.

Opt-in (``HISTOFED_DEPLOY_E2E=1 python -m pytest tests/test_deploy_e2e.py``): it starts about
ten Python processes that each import torch or Flower and a deployment round still costs
seconds (benchmarks/results/deploy.md), so it takes minutes on the shared 2-core machine,
more than the whole default suite may. Every process it starts is
stopped by PID in the fixture's ``finally``, also when the test fails.
"""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import tiny_config_dict
from test_flower_engine import _assert_same_weights, _final, _test_rows

from histofed.config import config_from_dict, dump_toml
from histofed.engine import deploy, deploy_procs, run_experiment
from histofed.engine.deploy_procs import DeployError
from histofed.engine.deploy_security import make_certs, make_node_key
from histofed.engine.rundir import new_run_dir, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("HISTOFED_DEPLOY_E2E") != "1",
    reason="a real localhost deployment takes minutes: set HISTOFED_DEPLOY_E2E=1 to run it")]
SITES = ["synthetic-0", "synthetic-1", "synthetic-2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """SuperLink (TLS + node auth) and one SuperNode per site; refusals recorded."""
    root = tmp_path_factory.mktemp("deploy")
    state = root / "state"
    certs = make_certs(root / "certs")
    keys = {s: make_node_key(root / "keys", s) for s in [*SITES, "rogue"]}
    port = deploy_procs.free_port()
    refused = {}
    try:
        deploy.start_superlink(state, certs=root / "certs", port=port)
        for site in SITES:
            deploy.register(state, keys[site][1], site=site)

        def node(i_site):
            i, site = i_site
            return deploy.start_supernode(
                state, site=site, superlink=f"127.0.0.1:{port}", ca=certs["ca"],
                key=keys[site][0], runtime_port=deploy_procs.free_port(), timeout=600)

        def rogue():  # a valid TLS client whose key was never registered
            try:
                deploy.start_supernode(state, site="rogue", superlink=f"127.0.0.1:{port}",
                                       ca=certs["ca"], key=keys["rogue"][0],
                                       runtime_port=deploy_procs.free_port(), timeout=600)
            except DeployError as err:
                refused["unregistered"] = str(err)

        def keyless():  # TLS but no authentication key at all
            cmd = [deploy_procs.program("flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                   "--root-certificates", str(certs["ca"]), "--isolation", "process",
                   "--port", str(deploy_procs.free_port()), "--max-retries", "2",
                   "--node-config", 'site="synthetic-1"']  # would take synthetic-1's jobs
            proc = deploy_procs.start_process(state, "keyless", cmd,
                                              deploy_procs.flower_env(state))
            deadline = time.monotonic() + 600
            while deploy_procs.alive(proc) and time.monotonic() < deadline:
                time.sleep(1)
            refused["keyless"] = open(proc.log).read()

        with ThreadPoolExecutor(6) as pool:
            jobs = [pool.submit(node, (i, s)) for i, s in enumerate(SITES)]
            jobs += [pool.submit(rogue), pool.submit(keyless)]
            for job in jobs:
                job.result()
        yield state, refused
    finally:
        deploy_procs.stop_all(state)


def _inprocess(tmp_path, cfg):
    out = new_run_dir(tmp_path / "ref", cfg.run.name)
    run_experiment(cfg, data_root=None, run_dir=out)
    return out


@pytest.mark.parametrize("method, options", [("fedavg", {}), ("fedprox", {"mu": 0.1})])
def test_deployment_with_tls_and_auth_equals_inprocess(cluster, tmp_path, method, options):
    state, _ = cluster
    cfg = config_from_dict(tiny_config_dict(method, algorithm=options), source="e2e")
    exp = tmp_path / "exp.toml"
    exp.write_text(dump_toml(cfg.to_dict()))
    out = tmp_path / "deployed"
    assert deploy.run(state, exp, out, round_timeout=600.0, node_wait=120.0) == \
        "finished:completed"
    ref = _inprocess(tmp_path, cfg)
    _assert_same_weights(_final(out), _final(ref))
    assert _test_rows(out) == _test_rows(ref) and len(_test_rows(out)) == 3 * 3
    assert read_jsonl(out / "egress.jsonl") == read_jsonl(ref / "egress.jsonl")
    run = json.loads((out / "run.json").read_text())
    assert [c["name"] for c in run["roster"]] == SITES


def test_unregistered_and_keyless_supernodes_are_refused(cluster):
    state, refused = cluster
    # the SuperLink refuses to activate them; they exit (Flower exit code 305) and never
    # receive a message
    assert "Failed to activate SuperNode" in refused["unregistered"]
    assert "Exit Code: 305" in refused["keyless"], refused["keyless"][-2000:]
    for name in ("supernode-rogue", "keyless"):
        assert "Receiving" not in (state / "logs" / f"{name}.log").read_text()
    nodes = deploy.flwr(state, "supernode", "ls", deploy.CONNECTION, "--format", "json").stdout
    assert nodes.count('"online"') == len(SITES), nodes  # only the registered three
