"""A long-lived ClientApp process for one SuperNode (``flower-supernode --isolation process``).

Flower 1.42's default (``--isolation subprocess``) starts a fresh ``flwr-clientapp`` process
for every message: it imports torch and MONAI and rebuilds the site's data each time (about
100 s per round for the 3-site demo on a busy 2-core machine). With ``--isolation process``
the SuperNode launches nothing and waits for an outside process to take its tasks from its
Runtime API. This module is that process: it does what Flower's ``flower-superexec`` and
``flwr-clientapp`` do for one task (AcquireTask -> token, PullTaskInput, run the ClientApp,
PushMessages, PushTaskOutput, with task heartbeats), using Flower's own functions for each
step, but in a loop in one process, so imports and ``flower.py``'s per-process caches
(``cached_federation``, ``_RUNTIMES``) survive from one message to the next.

It runs histofed's own ``client_app`` and refuses a run whose Flower App names another
ClientApp, so a hospital's node executes no code sent over the network.

Run it as ``python -m histofed.engine.deploy_worker --runtime-api-address 127.0.0.1:9094
--insecure --parent-pid SUPERNODE_PID`` (``histofed deploy supernode`` does).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from histofed.engine import flower as F  # sets the FLWR_* defaults, imports torch once
from histofed.flower_patches import patch_clientapp

from flwr.app import Message  # noqa: E402
from flwr.app.error import Error  # noqa: E402
from flwr.common.config import get_fab_config  # noqa: E402
from flwr.common.constant import ErrorCode, SubStatus  # noqa: E402
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: E402  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor  # noqa: E402
from flwr.supercore.constant import TaskType  # noqa: E402
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http  # noqa: E402
from flwr.supercore.interceptors import (  # noqa: E402
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker  # noqa: E402
from flwr.supercore.runtime import RuntimeHttpClient  # noqa: E402
from flwr.supernode.runtime.run_clientapp import (  # noqa: E402
    pull_task_input,
    push_message,
    push_task_output,
)

CLIENT_APP_REF = "histofed.engine.flower:client_app"
log = logging.getLogger("histofed.deploy_worker")


def _client(address: str, insecure: bool, root_cert: bytes | None, *extra) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=root_cert,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *extra],
        retry_invoker=make_simple_http_retry_invoker())


def _check_app(fab_content: bytes) -> None:
    ref = get_fab_config(fab_content)["tool"]["flwr"]["app"]["components"].get("clientapp")
    if ref != CLIENT_APP_REF:
        raise RuntimeError(f"this histofed SuperNode runs only {CLIENT_APP_REF}; the run's "
                           f"Flower App names clientapp = {ref!r}")


def run_task(address: str, token: str, insecure: bool, root_cert: bytes | None) -> None:
    """One task: what ``flwr-clientapp --token`` does, without exiting the process."""
    client = _client(address, insecure, root_cert, RuntimeTokenHttpInterceptor(token))
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context, message, reply = None, None, None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    marks = [time.monotonic()]  # phase times, logged: where a slow task spends its time
    try:
        message, context, _run, fab = pull_task_input(client)
        marks.append(time.monotonic())
        _check_app(fab.content)
        reply = F.client_app(message=message, context=context)
        marks.append(time.monotonic())
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - reported to the ServerApp, as flwr-clientapp does
        log.exception("ClientApp raised an exception")
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                            reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            marks.append(time.monotonic())
            push_task_output(client=client, context=context, sub_status=status, details=details)
            heartbeat.stop()
            client.close()
            steps = [f"{b - a:.2f}" for a, b in zip(marks, marks[1:])]
            log.info("task phases (pull input, ClientApp, push reply) s: %s", " ".join(steps))


def serve(address: str, *, insecure: bool, root_cert: bytes | None, poll: float) -> None:
    """Take ClientApp tasks from the SuperNode's Runtime API until killed."""
    client = _client(address, insecure, root_cert)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    log.info("histofed ClientApp worker %d polling %s every %.2f s", os.getpid(), address, poll)
    while True:
        res = client.AcquireTask(request)
        if res.HasField("task") and res.token:
            started = time.monotonic()
            run_task(address, res.token, insecure, root_cert)
            log.info("task %d done in %.2f s", res.task.task_id, time.monotonic() - started)
        else:
            time.sleep(poll)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true",
                        help="plain HTTP to the SuperNode's Runtime API (it listens on loopback)")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the SuperNode) is gone")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between polls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # raises SIGINT when the node is gone
    patch_clientapp()  # no 1 s sleep when a job's objects are still on their way to the node
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # nothing to flush: the node keeps state
    root = open(args.root_certificates, "rb").read() if args.root_certificates else None
    try:
        serve(args.runtime_api_address, insecure=args.insecure, root_cert=root, poll=args.poll)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
