"""histofed objects <-> Flower records (the wire format of the Flower engine).

A :class:`~histofed.algorithms.base.Payload` becomes three records under one prefix::

    <prefix>.arrays   ArrayRecord   one uint8 array: every array's raw bytes back to back
                                    (dtype, shape and offset of each in the meta JSON)
    <prefix>.scalars  ConfigRecord  scalars Flower can hold as they are (bool/int/float/str and
                                    non-empty lists of one of those types)
    <prefix>.meta     ConfigRecord  {"kind": payload kind, "json": JSON of the other scalars
                                    and of the key order}

so ``records_to_payload(payload_to_records(p))`` gives back the same keys, dtypes, values and
kind. Client jobs, their results and a node's private state (kept in ``context.state``) use the
same encoding. No pickles cross the wire.

Why one packed array and not one Flower ``Array`` per tensor: a SuperNode fetches a message
from the SuperLink one object per request, and every ``Array`` is an object, so a UNet's ~60
tensors cost ~60 round trips per message (measured: 7-17 s to fetch one job's input on a busy
localhost, issue 13). Packed, a payload is a handful of objects whatever the model.
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

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from histofed.algorithms.base import Payload  # noqa: E402
from histofed.engine.runtime import ClientJob, JobResult  # noqa: E402

JOB = "histofed.job"  # ConfigRecord: kind, cid, round, config-sha
PAYLOAD = "histofed.payload"  # prefix of the payload records (both directions)
RESULT = "histofed.result"  # ConfigRecord: kind, cid, seconds, has-state[, error]
LOGS = "histofed.logs"  # MetricRecord: the client's local training log
METRICS = "histofed.metrics."  # + "<model>/<split>": MetricRecord
STATE = "histofed.client-state"  # prefix of the private state inside a node's context.state

_INT64 = (-(2**63), 2**63 - 1)
_NATIVE = (bool, int, float, str)


def config_sha(config_text: str) -> str:
    """Short fingerprint of a config text (jobs carry it so a node never mixes two runs)."""
    return hashlib.sha256(config_text.encode()).hexdigest()[:16]


# ---- payloads -------------------------------------------------------------------------------
def _native(value: Any) -> bool:
    """True when a ConfigRecord holds ``value`` and gives it back with the same Python type."""
    if isinstance(value, list):
        return bool(value) and type(value[0]) in _NATIVE and all(
            type(v) is type(value[0]) and _native(v) for v in value)
    if type(value) is int:
        return _INT64[0] <= value <= _INT64[1]
    return type(value) in _NATIVE


def payload_to_records(payload: Payload, prefix: str = PAYLOAD) -> dict[str, Any]:
    """The three records of ``payload`` (see the module docstring), keyed by record name.

    Raises:
        TypeError: an array is not a numpy array, or a scalar is not JSON-able.
    """
    packed, index = _pack(payload.arrays)
    native = {k: v for k, v in payload.scalars.items() if _native(v)}
    other = {k: v for k, v in payload.scalars.items() if k not in native}
    try:
        encoded = json.dumps({"order": list(payload.scalars), "values": other, "index": index},
                             separators=(",", ":"))
    except TypeError as err:
        raise TypeError(f"payload scalars must be JSON-able: {err}") from None
    return {
        f"{prefix}.arrays": ArrayRecord({"packed": Array(packed)}),
        f"{prefix}.scalars": ConfigRecord(native),
        f"{prefix}.meta": ConfigRecord({"kind": payload.kind, "json": encoded}),
    }


def records_to_payload(records: RecordDict, prefix: str = PAYLOAD) -> Payload:
    """Inverse of :func:`payload_to_records`; raises KeyError naming a missing record."""
    try:
        arrays, scalars, meta = (records[f"{prefix}.{part}"] for part in ("arrays", "scalars", "meta"))
    except KeyError as err:
        raise KeyError(f"message has no record {err}; sender and receiver run different "
                       "histofed versions?") from None
    extra = json.loads(str(meta["json"]))
    out = _unpack(arrays["packed"].numpy(), extra["index"])
    values = {k: (list(v) if isinstance(v, list) else v) for k, v in scalars.items()}
    values.update(extra["values"])
    return Payload(out, {k: values[k] for k in extra["order"]}, kind=str(meta["kind"]))


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


def _metric_record(values: dict[str, Any], what: str) -> MetricRecord:
    """MetricRecord of numbers; numpy scalars become Python ones, anything else is an error."""
    out: dict[str, int | float] = {}
    for key, value in values.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"{what} {key!r} = {value!r}: metrics must be numbers")
        out[key] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return MetricRecord(out)


def result_to_content(result: JobResult, has_state: bool) -> RecordDict:
    """The RecordDict of a reply: payload (fit), metrics (evaluate), logs, error; never state.

    ``has_state`` tells the server whether this client keeps private state (not what it is),
    so it can refuse a resume that would silently lose that state.
    """
    content = RecordDict()
    info: dict[str, Any] = {"kind": result.kind, "cid": int(result.cid),
                            "seconds": float(result.seconds), "has-state": bool(has_state)}
    if result.error is not None:
        info["error"] = str(result.error)
    content[RESULT] = ConfigRecord(info)
    if result.payload is not None:
        for key, record in payload_to_records(result.payload).items():
            content[key] = record
    content[LOGS] = _metric_record(result.logs, "log")
    for key, metrics in result.metrics.items():
        content[METRICS + key] = _metric_record(metrics, f"metric of {key}")
    return content


def content_to_result(content: RecordDict) -> tuple[JobResult, bool]:
    """(JobResult, client has private state) from a reply's content."""
    info = content[RESULT]
    result = JobResult(kind=str(info["kind"]), cid=int(info["cid"]),
                       seconds=float(info["seconds"]),
                       error=str(info["error"]) if "error" in info else None)
    if has_payload(content):
        result.payload = records_to_payload(content)
    result.logs = dict(content[LOGS]) if LOGS in content else {}
    result.metrics = {key[len(METRICS):]: dict(record) for key, record in content.items()
                      if key.startswith(METRICS)}
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
