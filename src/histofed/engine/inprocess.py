"""The embedded engine: clients run in this machine's worker processes (or in sequence).

The transport is the client side: it holds the federation (the sites' data) and tells the
server side (:class:`~histofed.engine.loop.Experiment`) only each site's roster entry. Each
worker process holds one ClientRuntime (the federation is inherited once, at start) and uses
one torch thread, so ``workers`` clients train at once on ``workers`` cores. Jobs carry the
client's private state in and out; results do not depend on ``workers`` because every job
builds its model afresh and draws randomness from (seed, round, client) only.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed

import torch
from tqdm.auto import tqdm

from histofed.algorithms.base import ClientInfo
from histofed.config import Config
from histofed.data.federation import Federation
from histofed.engine.runtime import ClientJob, ClientRuntime, JobResult

_RUNTIME: ClientRuntime | None = None


def exit_with_parent(parent_pid: int, interval: float = 0.5) -> threading.Thread:
    """End this worker process as soon as ``parent_pid`` is gone (e.g. SIGKILLed).

    A forked worker holds both ends of its task pipe, so it never sees EOF when the parent
    dies and would wait forever holding its memory. A daemon thread notices the re-parenting
    (``os.getppid()`` changes) and exits the process.
    """
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)

    thread = threading.Thread(target=watch, name="histofed-parent-watch", daemon=True)
    thread.start()
    return thread


def _init_worker(runtime: ClientRuntime, parent_pid: int | None = None) -> None:
    global _RUNTIME
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    torch.set_num_threads(1)  # a worker process: its own thread settings
    torch.set_num_interop_threads(1)
    _RUNTIME = runtime


def _run_job(job: ClientJob) -> JobResult:
    assert _RUNTIME is not None, "worker not initialised"
    return _RUNTIME.run(job)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class InProcessTransport:
    """Runs client jobs here: in ``workers`` processes, or sequentially when ``workers == 1``.

    While it is open, this process uses one torch thread too (the server side's aggregation,
    and the clients when ``workers == 1``): the same float results whatever the number of
    workers, and no oversubscribed cores. ``close`` restores the caller's thread setting.
    """

    keeps_state = True  # the engine carries each client's private state in the jobs

    def __init__(self, config: Config, federation: Federation, workers: int = 0) -> None:
        self.workers = max(1, min(workers or default_workers(), len(federation.clients)))
        self._pool: ProcessPoolExecutor | None = None
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._local = ClientRuntime(config, federation)
        self.roster: list[ClientInfo] = self._local.roster()  # what the sites tell the server
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=_mp_context(),
                initializer=_init_worker, initargs=(self._local, os.getpid()))

    def run(self, jobs: list[ClientJob], desc: str = "clients") -> list[JobResult]:
        """Run jobs, biggest first (so the slowest client does not start last)."""
        bar = tqdm(total=len(jobs), desc=desc, leave=False, unit="client", dynamic_ncols=True)
        results: dict[int, JobResult] = {}
        try:
            if self._pool is None:
                for i, job in enumerate(jobs):
                    results[i] = self._local.run(job)
                    bar.update()
            else:
                futures: dict[Future, int] = {}
                order = sorted(range(len(jobs)), key=lambda i: -jobs[i].cost)
                for i in order:
                    futures[self._pool.submit(_run_job, jobs[i])] = i
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update()
        finally:
            bar.close()
        return [results[i] for i in range(len(jobs))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        torch.set_num_threads(self._threads)


def _mp_context():
    """fork where available: workers inherit the imported modules and the federation (no
    re-import of torch/MONAI, no pickling of the data), which makes start-up near-instant.
    Workers use one torch thread, as PyTorch's own DataLoader workers do after a fork."""
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")
