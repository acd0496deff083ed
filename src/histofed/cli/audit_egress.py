"""`histofed audit egress RUN_DIR`: what left each site and what reached it, from the run's
``egress.jsonl`` (one row per payload and kind: round, client, direction, kind, bytes, phase,
sha256). Summarised per site and kind; anything unexpected is flagged:

- kind "raw-data": a site's raw training data left it (the centralised baseline pools data);
- rows without a checksum (written before checksums were logged, or damaged);
- a client the run's roster does not name, or a held-out site ([federation].unseen) uploading;
- a direction other than "up"/"down".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from histofed.cli.errors import friendly_errors

MB = 1e6


def summarise(run_dir: Path) -> dict[str, Any]:
    """{"sites": [per (site, kind) totals], "flags": [messages], "rows": n} of a run directory.

    Raises:
        FileNotFoundError: no egress.jsonl in ``run_dir`` (with what to pass instead).
    """
    from histofed.jsonl import iter_jsonl

    path = run_dir / "egress.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a run directory written by "
                                "`histofed run` (it logs every payload in egress.jsonl)")
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() \
        else {}
    known = set(info.get("clients", [])) | set(info.get("unseen", [])) | {"pooled"}
    unseen = set(info.get("unseen", []))
    notes: list[str] = []
    sites: dict[tuple[str, str], dict[str, Any]] = {}
    flags: list[str] = []
    unchecked: dict[str, int] = {}
    n = 0
    for line, row in iter_jsonl(path, notes):
        n += 1
        client, kind, direction = str(row.get("client")), str(row.get("kind")), row.get("direction")
        entry = sites.setdefault((client, kind), {
            "site": client, "kind": kind, "bytes_up": 0, "bytes_down": 0, "payloads_up": 0,
            "payloads_down": 0, "rounds": set()})
        if direction not in ("up", "down"):
            flags.append(f"line {line}: direction {direction!r} is neither up nor down")
            continue
        entry[f"bytes_{direction}"] += int(row.get("bytes", 0))
        entry[f"payloads_{direction}"] += 1
        entry["rounds"].add(int(row.get("round", 0)))
        if kind == "raw-data":
            flags.append(f"{client}: raw training data left the site in round {row.get('round')} "
                         f"({int(row.get('bytes', 0)) / MB:.2f} MB): the centralised baseline "
                         "pools data; a federated method never does")
        elif "sha256" not in row:
            unchecked[client] = unchecked.get(client, 0) + 1
        if known - {"pooled"} and client not in known:
            flags.append(f"line {line}: client {client!r} is not in this run's roster")
        if client in unseen and direction == "up":
            flags.append(f"line {line}: held-out site {client!r} uploaded {kind!r} (held-out "
                         "sites are only scored)")
    for client, count in sorted(unchecked.items()):
        flags.append(f"{client}: {count} rows without a checksum (a run from before checksums "
                     "were logged, or an edited log): their content cannot be verified")
    out = []
    for entry in sorted(sites.values(), key=lambda e: (e["site"], e["kind"])):
        rounds = sorted(entry.pop("rounds"))
        out.append({**entry, "rounds": len(rounds),
                    "first_round": rounds[0] if rounds else None,
                    "last_round": rounds[-1] if rounds else None})
    return {"run_dir": str(run_dir), "rows": n, "sites": out, "flags": flags, "notes": notes}


def table(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table plus its flags."""
    head = ("site", "kind", "up MB", "down MB", "payloads up", "payloads down", "rounds")
    rows = [(s["site"], s["kind"], f"{s['bytes_up'] / MB:.3f}", f"{s['bytes_down'] / MB:.3f}",
             str(s["payloads_up"]), str(s["payloads_down"]),
             f"{s['rounds']} ({s['first_round']}-{s['last_round']})" if s["rounds"] else "0")
            for s in summary["sites"]]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    lines = [f"egress of {summary['run_dir']} ({summary['rows']} rows; 1 MB = 10^6 bytes; "
             "up = sent by the site)", "", fmt(head), fmt(tuple("-" * w for w in widths)),
             *map(fmt, rows), ""]
    flags = summary["flags"] + summary["notes"]
    lines += [f"{len(flags)} flagged:" if flags else "nothing unexpected flagged.",
              *[f"  - {f}" for f in flags]]
    return "\n".join(lines)


@friendly_errors
def egress(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (holds egress.jsonl).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Summarise what each site sent and received: bytes, payloads and rounds per kind.

    \b
    Example:
      histofed audit egress runs/20261123-101500-fedavg-nuclei
      histofed audit egress runs/20261123-101500-fedavg-nuclei --json

    Flags raw data leaving a site (the centralised baseline), rows without a SHA-256 checksum
    (older runs), clients the roster does not name and uploads from held-out sites. Each row's
    checksum is the SHA-256 of the payload's canonical bytes (Payload.sha256), so a site can
    compare it with what it sent.
    """
    summary = summarise(run_dir)
    typer.echo(json.dumps(summary, indent=2) if as_json else table(summary))
