"""Render the CLI reference (every command's --help) into README.md between two markers.

    python -m pfp_onnx_cli.reference          # rewrite README.md's reference section
    python -m pfp_onnx_cli.reference --check  # exit 1 if it is out of date (a test runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pfp_onnx_cli.main import main

BEGIN, END = "<!-- cli-reference:begin -->", "<!-- cli-reference:end -->"
WIDTH = 100


def reference() -> str:
    parts = []
    for name in ["", *sorted(main.commands)]:
        command = main if not name else main.commands[name]
        info_name = "pfp-onnx" if not name else f"pfp-onnx {name}"
        context = click.Context(command, info_name=info_name, max_content_width=WIDTH, terminal_width=WIDTH)
        parts.append(f"```\n$ {info_name} --help\n{command.get_help(context)}\n```")
    return "\n\n".join(parts)


def updated(readme: str) -> str:
    start, stop = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + reference() + "\n" + readme[stop:]


USAGE = """usage: python -m pfp_onnx_cli.reference [--check]

Regenerate the CLI reference in README.md (between its cli-reference markers) from every command's --help.
Without options it REWRITES README.md in place.

  --check     only compare: exit 1 if README.md's reference is out of date, 0 if it is current; write nothing
  -h, --help  show this message"""


def run(argv: list[str]) -> int:
    asked_for_help = bool({"-h", "--help"} & set(argv))
    if asked_for_help or set(argv) - {"--check"}:
        print(USAGE, file=sys.stdout if asked_for_help else sys.stderr)
        return 0 if asked_for_help else 2
    path = Path(__file__).resolve().parent.parent / "README.md"
    text = path.read_text()
    if "--check" in argv:
        return 0 if updated(text) == text else 1
    path.write_text(updated(text))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
