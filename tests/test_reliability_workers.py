"""Worker processes never outlive the run (issue #14: SIGKILL of the parent left them waiting)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PARENT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config_dict
    from histofed.config import config_from_dict
    from histofed.engine import load_federation
    from histofed.engine.inprocess import InProcessTransport

    cfg = config_from_dict(tiny_config_dict(run={{"workers": 2}}))
    transport = InProcessTransport(cfg, load_federation(cfg, None), 2)
    pids = set()
    while len(pids) < 2:  # both workers are up and initialised
        pids |= {{f.result() for f in [transport._pool.submit(os.getpid) for _ in range(8)]}}
    print(*sorted(pids), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited


@pytest.mark.skipif(not Path("/proc").is_dir() or sys.platform != "linux",
                    reason="reads process states from /proc (Linux)")
def test_workers_exit_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as fout, open(err, "w") as ferr:  # files: orphans cannot block a pipe
        proc = subprocess.run([sys.executable, str(script)], stdout=fout, stderr=ferr, env=env,
                              timeout=120)
    assert proc.returncode == -9, err.read_text()[-2000:]
    pids = [int(p) for p in out.read_text().split()]
    assert len(pids) == 2
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    survivors = [p for p in pids if _alive(p)]
    for pid in survivors:  # do not leak them even when the test fails
        os.kill(pid, 9)
    assert not survivors, f"workers {survivors} outlived their killed parent"
