"""histofed objects <-> Flower records (the wire format of the Flower engine).

A :class:`~histofed.algorithms.base.Payload` becomes two records under one prefix::

    <prefix>.arrays   ArrayRecord   one uint8 array: every array's raw bytes back to back
                                    (dtype, shape and offset of each in the meta JSON)
    <prefix>.meta     ConfigRecord  {"kind": payload kind, "json": JSON of the scalars (in
                                    their order) and of the arrays' index}

so ``records_to_payload(payload_to_records(p))`` gives back the same keys, dtypes, values and
kind (JSON keeps int vs float, bool, lists, NaN). Client jobs, their results and a node's
private state (kept in ``context.state``) use the same encoding. A reply's local training log
and metrics are JSON in its result record. No pickles cross the wire.

Why one packed array and not one Flower ``Array`` per tensor: a SuperNode fetches a message
from the SuperLink one object per request, and every ``Array`` is an object, so a UNet's ~60
tensors cost ~60 round trips per message (measured: 7-17 s to fetch one job's input on a busy
localhost, issue 13). Packed, a payload is a handful of objects whatever the model. For the
same reason every record counts: each is one more object (one more request on each of the
six hops of a job and its reply). A fit job is 7 objects (Message, RecordDict, job record,
ArrayRecord, Array, its chunk, payload meta), an evaluate reply 3 (Message, RecordDict, result
record); before scalars, logs and metrics were folded in, 8 and 5 + one per metric table.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from typing import Any

import numpy as np

# Before flwr is imported (and inherited by Ray workers): no pip installs at run time, no
# telemetry, no update check. The user's own settings win.
for _key, _value in (("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
                     ("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1")):
    os.environ.setdefault(_key, _value)

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from histofed.algorithms.base import Payload  # noqa: E402
from histofed.engine.runtime import ClientJob, JobResult  # noqa: E402

JOB = "histofed.job"  # ConfigRecord: kind, cid, round, config-sha
PAYLOAD = "histofed.payload"  # prefix of the payload records (both directions)
RESULT = "histofed.result"  # ConfigRecord: kind, cid, seconds, has-state, logs, metrics[, error]
STATE = "histofed.client-state"  # prefix of the private state inside a node's context.state



def config_sha(config_text: str) -> str:
    """Short fingerprint of a config text (jobs carry it so a node never mixes two runs)."""
    return hashlib.sha256(config_text.encode()).hexdigest()[:16]


# ---- payloads -------------------------------------------------------------------------------
def payload_to_records(payload: Payload, prefix: str = PAYLOAD) -> dict[str, Any]:
    """The two records of ``payload`` (see the module docstring), keyed by record name.

    Raises:
        TypeError: an array is not a numpy array, or a scalar is not JSON-able.
    """
    packed, index = _pack(payload.arrays)
    try:
        encoded = json.dumps({"scalars": payload.scalars, "index": index}, separators=(",", ":"))
    except TypeError as err:
        raise TypeError(f"payload scalars must be JSON-able: {err}") from None
    return {
        f"{prefix}.arrays": ArrayRecord({"packed": Array(packed)}),
        f"{prefix}.meta": ConfigRecord({"kind": payload.kind, "json": encoded}),
    }


def records_to_payload(records: RecordDict, prefix: str = PAYLOAD) -> Payload:
    """Inverse of :func:`payload_to_records`; raises KeyError naming a missing record."""
    try:
        arrays, meta = (records[f"{prefix}.{part}"] for part in ("arrays", "meta"))
        extra = json.loads(str(meta["json"]))
        scalars, index = extra["scalars"], extra["index"]
    except KeyError as err:
        raise KeyError(f"message has no {err}; sender and receiver run different histofed "
                       "versions?") from None
    return Payload(_unpack(arrays["packed"].numpy(), index), scalars, kind=str(meta["kind"]))


def _pack(arrays: dict[str, Any]) -> tuple[np.ndarray, list[list]]:
    """(uint8 buffer of every array's bytes, [[name, dtype, shape, offset, nbytes], ...])."""
    index, parts, offset = [], [], 0
    for name, value in arrays.items():
        if not isinstance(value, (np.ndarray, np.generic)):
            raise TypeError(f"payload array {name!r} is a {type(value).__name__}, not a numpy array")
        value = np.asarray(value)
        value = value if value.flags.c_contiguous else value.copy(order="C")  # keeps 0-d shape
        if value.dtype == object or value.dtype.fields is not None:
            raise TypeError(f"payload array {name!r} has dtype {value.dtype}; it cannot be sent")
        raw = value.tobytes()
        index.append([name, value.dtype.str, list(value.shape), offset, len(raw)])
        parts.append(raw)
        offset += len(raw)
    return np.frombuffer(b"".join(parts), dtype=np.uint8), index


def _unpack(buffer: np.ndarray, index: list[list]) -> dict[str, np.ndarray]:
    """Inverse of :func:`_pack`: independent, writable arrays with their dtype and shape."""
    raw = np.ascontiguousarray(buffer, dtype=np.uint8)
    out = {}
    for name, dtype, shape, offset, nbytes in index:
        dt = np.dtype(dtype)
        out[name] = np.frombuffer(raw, dtype=dt, count=nbytes // dt.itemsize if dt.itemsize
                                  else 0, offset=offset).reshape(shape).copy()
    return out


def has_payload(records: RecordDict, prefix: str = PAYLOAD) -> bool:
    return f"{prefix}.meta" in records


# ---- jobs and results -----------------------------------------------------------------------
def job_to_content(job: ClientJob, sha: str) -> RecordDict:
    """The RecordDict of a job message: the job itself and its payload (never its state)."""
    content = RecordDict()
    content[JOB] = ConfigRecord({"kind": job.kind, "cid": int(job.cid), "round": int(job.round),
                                 "config-sha": sha, "evaluate-after": bool(job.evaluate_after)})
    for key, record in payload_to_records(job.payload).items():
        content[key] = record
    return content


def content_to_job(content: RecordDict) -> tuple[ClientJob, str]:
    """(job without state, config fingerprint) from a job message's content."""
    info = content[JOB]
    job = ClientJob(kind=str(info["kind"]), cid=int(info["cid"]), round=int(info["round"]),
                    payload=records_to_payload(content),
                    evaluate_after=bool(info.get("evaluate-after", False)))
    return job, str(info["config-sha"])


def _numbers(values: dict[str, Any], what: str) -> dict[str, int | float]:
    """Numbers only: numpy scalars become Python ones, anything else is an error."""
    out: dict[str, int | float] = {}
    for key, value in values.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"{what} {key!r} = {value!r}: metrics must be numbers")
        out[key] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return out


def result_to_content(result: JobResult, has_state: bool) -> RecordDict:
    """The RecordDict of a reply: payload (fit), metrics (evaluate), logs, error; never state.

    ``has_state`` tells the server whether this client keeps private state (not what it is),
    so it can refuse a resume that would silently lose that state.
    """
    content = RecordDict()
    metrics = {key: _numbers(values, f"metric of {key}") for key, values in result.metrics.items()}
    info: dict[str, Any] = {"kind": result.kind, "cid": int(result.cid),
                            "seconds": float(result.seconds), "has-state": bool(has_state),
                            "logs": json.dumps(_numbers(result.logs, "log")),
                            "metrics": json.dumps(metrics)}
    if result.error is not None:
        info["error"] = str(result.error)
    content[RESULT] = ConfigRecord(info)
    if result.payload is not None:
        for key, record in payload_to_records(result.payload).items():
            content[key] = record
    return content


def content_to_result(content: RecordDict) -> tuple[JobResult, bool]:
    """(JobResult, client has private state) from a reply's content."""
    info = content[RESULT]
    result = JobResult(kind=str(info["kind"]), cid=int(info["cid"]),
                       seconds=float(info["seconds"]),
                       error=str(info["error"]) if "error" in info else None)
    if has_payload(content):
        result.payload = records_to_payload(content)
    result.logs = json.loads(str(info["logs"]))
    result.metrics = json.loads(str(info["metrics"]))
    return result, bool(info["has-state"])


# ---- a node's private state -----------------------------------------------------------------
def load_state(state: RecordDict) -> Payload:
    """This node's private client state from ``context.state`` (empty at first)."""
    if not has_payload(state, STATE):
        return Payload(kind="state")
    return records_to_payload(state, STATE)


def store_state(state: RecordDict, payload: Payload) -> None:
    """Keep ``payload`` as this node's private client state in ``context.state``."""
    for key, record in payload_to_records(payload, STATE).items():
        state[key] = record
