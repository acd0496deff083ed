"""Shorter fixed waits on Flower 1.42's message path (issue 13: deployment overhead per round).

A timeline of one deployment round (benchmarks/results/deploy.md) showed several seconds of
a ~12 s localhost round spent in three waits that are constants in Flower's source, with no
flag or environment variable to change them (shortening them: 12.7 -> 8.0 s per round):

1. ``PULL_INITIAL_BACKOFF = 1`` (``flwr/supercore/constant.py:48``), the default
   ``initial_backoff`` of ``pull_objects`` and ``pull_and_inflate_object_from_tree``
   (``flwr/supercore/inflatable/inflatable_utils.py:208, 423``). A message becomes visible
   before its objects are uploaded, so a reader that is quick (the ClientApp worker while
   its SuperNode still fetches the job from the SuperLink; the ServerApp while a SuperNode
   still pushes a reply; a SuperNode while the ServerApp still pushes a batch) finds an
   object missing and sleeps 1 s before asking again, doubling up to 10 s
   (``PULL_BACKOFF_CAP``). Here: 0.05 s, doubling up to 0.2 s, so a reader asks again at
   most 0.2 s after its object arrived; it still gives up after Flower's ``PULL_MAX_TIME``
   (7200 s), not after Flower's 500 tries (which would be 100 s at 0.2 s).
2. ``time.sleep(3)`` in the SuperNode's loop when the SuperLink has no message for it
   (``flwr/supernode/start_client_internal.py:263``): a node that answered a round's fit
   job sleeps up to 3 s before it sees the evaluate job, and again before the next round.
   The slowest of three nodes waits ~2.25 s on average, twice per round. Here: 0.5 s.
3. ``time.sleep(0.5)`` while the SuperNode waits for its ClientApp's reply and for its
   objects (``start_client_internal.py:470, 506``). Here: 0.1 s (a local check).

Each patch rebinds one name in one Flower module (nothing else in Flower changes) and is
applied only in processes histofed starts: the ServerApp (``flower.server_main``), the
ClientApp worker (``deploy_worker``) and the SuperNode, which ``histofed deploy supernode``
runs as ``python -m histofed.flower_patches <flower-supernode arguments>`` (this module
stays out of ``histofed.engine`` so a SuperNode does not import torch). A Flower without
these names (pyproject pins ``flwr < 1.43``) is left as it is, with a warning.
``HISTOFED_FLOWER_PATCHES=0`` in a process's environment turns them all off (Flower's own
waits: to measure them, or to rule histofed out when debugging a deployment).
"""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from types import ModuleType

PULL_BACKOFF = 0.05  # s: first retry of an object not yet uploaded (Flower: 1 s)
PULL_BACKOFF_CAP = 0.2  # s: longest wait between retries (Flower: 10 s)
NODE_IDLE_POLL = 0.5  # s: SuperNode's wait when the SuperLink has no message (Flower: 3 s)
NODE_LOCAL_POLL = 0.1  # s: SuperNode's wait for its ClientApp's reply (Flower: 0.5 s)
_NODE_SLEEPS = {3: NODE_IDLE_POLL, 0.5: NODE_LOCAL_POLL}  # Flower's literal -> ours


def enabled() -> bool:
    """False when ``HISTOFED_FLOWER_PATCHES=0`` (then every ``patch_*`` does nothing)."""
    return os.environ.get("HISTOFED_FLOWER_PATCHES", "1") != "0"


def short_pull_backoff(module: ModuleType) -> list[str]:
    """Rebind ``module``'s Flower pull functions to retry after PULL_BACKOFF..PULL_BACKOFF_CAP
    (until Flower's own ``max_time``, whatever the number of tries).

    Returns:
        The names patched (``module.name``, now or before); those absent are skipped.
    """
    done = []
    for name in ("pull_objects", "pull_and_inflate_object_from_tree"):
        func = getattr(module, name, None)
        if func is None:
            continue
        if getattr(func, "keywords", {}).get("initial_backoff") != PULL_BACKOFF:
            setattr(module, name, functools.partial(
                func, initial_backoff=PULL_BACKOFF, backoff_cap=PULL_BACKOFF_CAP,
                max_tries_per_object=None))
        done.append(f"{module.__name__}.{name}")
    return done


class _NodeTime:
    """``time`` for Flower's SuperNode loop: its fixed sleeps shortened (see _NODE_SLEEPS),
    everything else the real ``time`` module."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(_NODE_SLEEPS.get(seconds, seconds))


def patch_serverapp() -> list[str]:
    """The ServerApp's pulls of replies (``HttpGrid.pull_messages``)."""
    if not enabled():
        return []
    from flwr.superlink.grid import http_grid

    return _checked(short_pull_backoff(http_grid), 1, "ServerApp")


def patch_clientapp() -> list[str]:
    """The ClientApp worker's pull of its task input (``run_clientapp.pull_task_input``)."""
    if not enabled():
        return []
    from flwr.supernode.runtime import run_clientapp

    return _checked(short_pull_backoff(run_clientapp), 1, "ClientApp")


def patch_supernode() -> list[str]:
    """The SuperNode's pulls of messages and its idle and reply polls."""
    if not enabled():
        return []
    from flwr.supernode import start_client_internal as sci

    done = short_pull_backoff(sci)
    if getattr(sci, "time", None) is time:
        sci.time = _NodeTime()
    if isinstance(getattr(sci, "time", None), _NodeTime):
        done.append(f"{sci.__name__}.time.sleep")
    return _checked(done, 2, "SuperNode")


def _checked(done: list[str], expected: int, who: str) -> list[str]:
    if len(done) < expected:
        warnings.warn(f"histofed.flower_patches: this Flower version lacks what the {who} patch "
                      f"expects (patched only {done}); its fixed waits stay as they are",
                      stacklevel=3)
    return done


def main() -> None:
    """``flower-supernode`` (Flower's own entry point, same arguments) with the patches."""
    from flwr.supernode.cli import flower_supernode

    patch_supernode()
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
