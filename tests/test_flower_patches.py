"""histofed.flower_patches: Flower 1.42's fixed waits on the message path, shortened (issue 13).

Each test fails against unpatched Flower: a 1 s first retry of a missing object, a 3 s idle
poll and a 0.5 s reply poll in the SuperNode's loop."""

import subprocess
import sys
import time

import pytest
from flwr.superlink.grid import http_grid
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
from flwr.supernode import start_client_internal as sci
from flwr.supernode.runtime import run_clientapp

from histofed import flower_patches as P
from histofed.engine import deploy
from histofed.engine.deploy_procs import Proc


@pytest.fixture
def flower_modules(monkeypatch):
    """Whatever the patches change is put back after the test."""
    for module, name in ((http_grid, "pull_objects"), (sci, "pull_objects"), (sci, "time"),
                         (run_clientapp, "pull_and_inflate_object_from_tree")):
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.delenv("HISTOFED_FLOWER_PATCHES", raising=False)


def _calls_until(ready_after: int) -> tuple[list[float], callable]:
    """A pull_object_fn whose object is missing for its first ``ready_after`` calls."""
    calls: list[float] = []

    def pull(object_id: str) -> bytes:
        calls.append(time.monotonic())
        if len(calls) <= ready_after:
            raise ObjectUnavailableError(object_id)
        return b"content"

    return calls, pull


@pytest.mark.parametrize("patch, module, name", [
    (P.patch_serverapp, http_grid, "pull_objects"),
    (P.patch_supernode, sci, "pull_objects"),
])
def test_a_missing_object_is_asked_for_again_within_a_fifth_of_a_second(
        flower_modules, patch, module, name):
    assert patch()  # the installed Flower has what the patch expects
    calls, pull = _calls_until(3)
    assert getattr(module, name)(["abc"], pull) == {"abc": b"content"}
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert len(gaps) == 3 and max(gaps) < 0.6  # Flower's own first retry: 1 s +- 20 %
    assert patch() == [f"{module.__name__}.{name}"] + (
        ["flwr.supernode.start_client_internal.time.sleep"] if module is sci else [])


def test_the_clientapp_worker_pull_is_patched_and_still_gives_up(flower_modules):
    assert P.patch_clientapp() == [
        "flwr.supernode.runtime.run_clientapp.pull_and_inflate_object_from_tree"]
    func = run_clientapp.pull_and_inflate_object_from_tree
    assert func.keywords == {"initial_backoff": P.PULL_BACKOFF,
                             "backoff_cap": P.PULL_BACKOFF_CAP, "max_tries_per_object": None}
    assert "max_time" not in func.keywords  # Flower's PULL_MAX_TIME still ends a lost pull


def test_the_supernode_loop_sleeps_less_and_keeps_the_rest_of_time(flower_modules, monkeypatch):
    P.patch_supernode()
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    for seconds in (3, 0.5, 1.7):
        sci.time.sleep(seconds)
    assert slept == [P.NODE_IDLE_POLL, P.NODE_LOCAL_POLL, 1.7]
    assert sci.time.time is time.time and sci.time.monotonic is time.monotonic


def test_histofed_flower_patches_0_leaves_flower_as_it_is(flower_modules, monkeypatch):
    monkeypatch.setenv("HISTOFED_FLOWER_PATCHES", "0")
    before = (http_grid.pull_objects, sci.pull_objects, sci.time)
    assert P.patch_serverapp() == P.patch_clientapp() == P.patch_supernode() == []
    assert (http_grid.pull_objects, sci.pull_objects, sci.time) == before
    assert sci.time is time


def test_histofed_starts_flower_supernode_through_the_patches(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(deploy, "start_process", lambda state, name, cmd, env: started.append(
        cmd) or Proc(name, 1, "", cmd, str(tmp_path / f"{name}.log")))
    monkeypatch.setattr(deploy, "_wait_for", lambda *a, **k: None)
    deploy.start_supernode(tmp_path, site="a", superlink="127.0.0.1:1", insecure=True)
    node, worker = started
    assert node[:3] == [sys.executable, "-m", "histofed.flower_patches"]
    assert node[3:5] == ["--superlink", "127.0.0.1:1"] and "histofed.engine.deploy_worker" in worker
    out = subprocess.run([sys.executable, "-m", "histofed.flower_patches", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: flower-supernode" in out.stdout
