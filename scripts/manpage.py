"""Write a man page (roff) for a click command and its subcommands, from their help texts.

Run by scripts/package with the packaged virtualenv's python, so the page describes exactly
the CLI the package installs:  python scripts/manpage.py MODULE:ATTR PROG VERSION > PROG.1
"""

from __future__ import annotations

import datetime
import importlib
import sys

import click


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote on a line."""
    lines = text.replace("\\", "\\e").splitlines()
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in lines)


def _options(ctx: click.Context, command: click.Command) -> list[str]:
    out: list[str] = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        out += [".TP", f"\\fB{_roff(names)}\\fR", _roff(help_text or "")]
    return out


def _section(ctx: click.Context, command: click.Command, title: str) -> list[str]:
    out = [f".SS {_roff(title)}" if ctx.parent else ".SH DESCRIPTION"]
    usage = " ".join(command.collect_usage_pieces(ctx))
    out += [".PP", f"\\fB{_roff(ctx.command_path)}\\fR {_roff(usage)}"]
    if command.help:
        for paragraph in click.unstyle(command.help).split("\b")[0].strip().split("\n\n"):
            out += [".PP", _roff(" ".join(paragraph.split()))]
    options = _options(ctx, command)
    if options:
        out += [".PP", "Options:", *options]
    return out


def manpage(command: click.Command, prog: str, version: str) -> str:
    """The whole page: NAME, SYNOPSIS, the top command, then one subsection per subcommand."""
    ctx = click.Context(command, info_name=prog)
    summary = command.get_short_help_str(limit=200)
    date = datetime.date.today().isoformat()
    out = [
        f'.TH {prog.upper()} 1 "{date}" "pushfw {version}" "User Commands"',
        ".SH NAME",
        f"{prog} \\- {_roff(summary)}",
        ".SH SYNOPSIS",
        f"\\fB{prog}\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        *_section(ctx, command, prog),
    ]
    if isinstance(command, click.Group):
        out.append(".SH COMMANDS")
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            out += _section(click.Context(sub, info_name=name, parent=ctx), sub, name)
    out += [
        ".SH SEE ALSO",
        "/usr/share/doc/pushfw/ (operating.md; worker.toml.example)",
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> None:
    target, prog, version = argv
    module, _, attr = target.partition(":")
    command = getattr(importlib.import_module(module), attr)
    assert isinstance(command, click.Command), f"{target} is not a click command"
    sys.stdout.write(manpage(command, prog, version))


if __name__ == "__main__":
    main(sys.argv[1:])
