"""Every `histofed ...` example in every --help and doc parses, and names files that exist
(issue #14: `histofed --help` pointed to configs/fedavg.toml, which never existed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from histofed.cli import app
from histofed.cli.run import parse_overrides
from histofed.config import load_config

REPO = Path(__file__).resolve().parents[1]
ROOT = typer.main.get_command(app)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")),
        *sorted((REPO / "configs").glob("*.toml")), REPO / "src" / "histofed" / "flower_app" / "README.md"]
# "histofed <command> ...": up to a backtick, end of line, a '#' comment or a table bar
EXAMPLE = re.compile(r"(?<![\w/.\-\[])histofed ((?:%s)\b[^`\n#|]*)" % "|".join(ROOT.commands))


def _help_texts() -> list[tuple[str, str]]:
    texts = []

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        parts = [cmd.help or "", cmd.epilog or ""]
        parts += [getattr(p, "help", None) or "" for p in cmd.params]
        texts.append((f"histofed {' '.join(path)} --help".replace("  ", " "), "\n".join(parts)))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, (*path, name))

    walk(ROOT, ())
    return texts


def examples() -> list[tuple[str, str]]:
    found = []
    for where, text in _help_texts() + [(str(p.relative_to(REPO)), p.read_text()) for p in DOCS]:
        for match in EXAMPLE.finditer(text.replace("\\\n", " ")):
            found.append((where, match.group(1).strip().rstrip(".,;:")))
    return found


ALL = examples()


def test_examples_were_found_in_help_and_docs():
    wheres = {w for w, _ in ALL}
    assert {"histofed run --help", "histofed --help", "README.md", "docs/data.md"} <= wheres
    assert len(ALL) > 40


def _resolve(args: list[str]) -> tuple[click.Command, list[str], str]:
    cmd, path = ROOT, ["histofed"]
    while isinstance(cmd, click.Group) and args and args[0] in cmd.commands:
        cmd, path, args = cmd.commands[args[0]], [*path, args[0]], args[1:]
    return cmd, args, " ".join(path)


@pytest.mark.parametrize("where, example", ALL, ids=[f"{w}: {e}"[:90] for w, e in ALL])
def test_example_parses_and_its_config_exists(where, example):
    args = shlex.split(example)
    cmd, rest, name = _resolve(args)
    assert not isinstance(cmd, click.Group), f"{where}: `histofed {example}` names no command"
    if not rest:
        return  # a mention of the command itself (e.g. "see `histofed data inspect`")
    try:
        ctx = cmd.make_context(name, list(rest))  # options, arguments and their types
    except click.ClickException as err:
        pytest.fail(f"{where}: `histofed {example}` does not parse: {err.format_message()}")
    for value in [v for v in rest if v.startswith("configs/")]:
        assert (REPO / value).is_file(), f"{where}: `histofed {example}` names missing {value}"
        sets = ctx.params.get("set_") or []
        config = load_config(REPO / value, parse_overrides(list(sets)))
        from histofed.algorithms import build_algorithm

        build_algorithm(config.algorithm)  # algorithm options named by --set exist
