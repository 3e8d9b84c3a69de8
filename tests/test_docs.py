"""The docs stay true: every `medfed ...` command they show parses against the real command, every relative link
resolves, and the Python API example in docs/api.md runs.

Commands are parsed with click (the Typer app's own parser: subcommands, options, option values, required
arguments) without running them. Shell code blocks (```bash, ```sh, ```console or unlabelled) are checked in full;
a command that elides its arguments with `...` and commands quoted inline in prose or tables (`medfed x --y Y`)
are checked for their subcommands and option names only, since they use placeholders such as `N` or `[--out DIR]`.
docs/architecture.md's unlabelled blocks are flow diagrams, not commands: only its inline commands are checked.
"""

from __future__ import annotations

import re
import runpy
import shlex
import tempfile
from pathlib import Path

import click
import pytest
import typer.main

from medfed.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", REPO / "CONTRIBUTING.md", *(REPO / "docs").rglob("*.md")])
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
DIAGRAM_PAGES = {REPO / "docs" / "architecture.md"}
FENCE = re.compile(r"^( *)(```+)([\w-]*)[^\n]*\n(.*?)^\1\2[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`(medfed(?: [^`\n]*)?)`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CONTROL = {"&&", "||", ";", "|"}
RUN_MARKER = "<!-- tests/test_docs.py runs the next code block -->"
MEDFED = typer.main.get_command(app)


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def strip_comment(line: str) -> str:
    """``line`` without a shell comment (a ``#`` at the start of a word, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_lines(block: str) -> list[str]:
    """Logical lines of a shell block: continuation lines joined, comments and ``$ `` prompts removed."""
    joined = re.sub(r"\\\n", " ", block)
    lines = []
    for line in joined.splitlines():
        line = strip_comment(line).strip()
        lines.append(line[2:] if line.startswith("$ ") else line)
    return [line for line in lines if line]


def medfed_commands(line: str) -> list[list[str]]:
    """The argument lists of every ``medfed`` invocation on one shell line (after ``&&``, ``;`` or ``|`` too)."""
    commands, segment = [], []
    for token in shlex.split(line) + [";"]:
        if token not in CONTROL:
            segment.append(token)
            continue
        while segment and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[0]):  # VAR=value medfed ...
            segment.pop(0)
        if segment and re.fullmatch(r"(.*/)?medfed", segment[0]):
            commands.append(segment[1:])
        segment = []
    return commands


def doc_commands() -> list[tuple[str, list[str], bool]]:
    """(where, arguments after ``medfed``, names only) for every medfed command the docs show."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in FENCE.finditer(text):
            language, block = match.group(3).lower(), match.group(4)
            if language not in SHELL_LANGUAGES or (doc in DIAGRAM_PAGES and not language):
                continue
            line_no = text.count("\n", 0, match.start()) + 1
            for line in shell_lines(block):
                for args in medfed_commands(line):
                    found.append((f"{rel(doc)}:{line_no} {line}", args, "..." in args))
        prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
        for number, line in enumerate(prose.splitlines(), start=1):
            for match in INLINE.finditer(line):
                args = [a for a in (t.strip("[]").removesuffix("...") for t in match.group(1).split()[1:]) if a]
                # `medfed privacy plan/verify/report`: one command per alternative
                alternatives = next((i for i, a in enumerate(args[:2]) if re.fullmatch(r"[a-z-]+(/[a-z-]+)+", a)),
                                    None)
                for choice in args[alternatives].split("/") if alternatives is not None else [None]:
                    chosen = args if choice is None else [*args[:alternatives], choice, *args[alternatives + 1:]]
                    found.append((f"{rel(doc)}:{number} `{match.group(1)}`", chosen, True))
    return found


def check_command(args: list[str], names_only: bool) -> None:
    """Parse ``medfed args`` as the real command would, without running it.

    ``names_only``: stop at ``...`` and check only the subcommands and option names (values, missing and extra
    arguments are not checked). Raises click's UsageError (or NoSuchOption) for what the command would reject.
    """
    if names_only:
        args = args[: args.index("...")] if "..." in args else args
    options = [a.split("=", 1)[0] for a in (args[: args.index("--")] if "--" in args else args)
               if a.startswith("-") and a != "-"]
    command: click.Command = MEDFED
    name, parent, known = "medfed", None, {"--help"}
    while True:
        ctx = command.make_context(name, list(args), parent=parent, resilient_parsing=names_only)
        known.update(opt for param in command.params for opt in (*param.opts, *param.secondary_opts))
        rest = [*ctx._protected_args, *ctx.args] if isinstance(command, click.Group) else []
        if not rest:
            break
        name, sub, args = command.resolve_command(ctx, rest)
        if sub is None:
            raise click.UsageError(f"no such command {rest[0]!r}", ctx)
        command, parent = sub, ctx
    unknown = [opt for opt in options if opt not in known]
    if unknown:  # resilient parsing skips unknown options; the command itself would refuse them
        raise click.NoSuchOption(unknown[0], ctx=ctx)


COMMANDS = doc_commands()


def test_the_docs_show_commands_of_every_kind():
    assert len(COMMANDS) > 60
    shown = {" ".join(args[:2]) for _, args, _ in COMMANDS}
    for expected in ("train --centralized", "run --sites", "site init", "server run", "privacy report",
                     "review export", "study clients"):
        assert expected in shown, expected


def test_the_check_rejects_what_medfed_rejects():
    for args, names_only in [(["trian"], False), (["run", "--site", "3"], False), (["run", "--sites", "three"], False),
                             (["privacy", "plan"], False), (["server", "sitez"], True), (["sample", "--nmu"], True)]:
        with pytest.raises(click.UsageError):
            check_command(args, names_only)
    check_command(["privacy", "plan", "--examples", "600", "--rounds", "5"], False)
    check_command(["evaluate", "runs/x", "-f", "fid-helper"], False)  # `medfed evaluate RUN_DIR` means `report`
    check_command(["server", "register-site", "KEY.pub", "--name", "N", "...", "--bogus"], True)


@pytest.mark.parametrize("where,args,names_only", COMMANDS, ids=[w.split(" ", 1)[0] for w, _, _ in COMMANDS])
def test_documented_command_exists_and_parses(where, args, names_only):
    try:
        check_command(args, names_only)
    except click.exceptions.Exit as done:  # --help, --version
        assert done.exit_code == 0, where
    except click.UsageError as err:
        pytest.fail(f"{where}\n  medfed rejects it: {err.format_message()}")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = FENCE.sub("", doc.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+?) *#*$", text, re.M)}


def test_relative_links_between_docs_resolve():
    broken = []
    for doc in DOCS:
        text = FENCE.sub("", doc.read_text())
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path_part, _, fragment = target.partition("#")
            path = (doc.parent / path_part).resolve() if path_part else doc
            if not path.exists():
                broken.append(f"{rel(doc)}: {target} (no such file)")
            elif fragment and path.suffix == ".md" and fragment not in anchors(path):
                broken.append(f"{rel(doc)}: {target} (no heading '#{fragment}' in {rel(path)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_an_entrance():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) < 12 * 1024
    assert readme.index("make demo") < readme.index("## Quick start") and "make test" in readme
    for doc in DOCS:  # examples use placeholders or public data: users do not have the project's ../shared/data
        for match in FENCE.finditer(doc.read_text()):
            assert "shared/data" not in match.group(4), f"{rel(doc)}: an example uses ../shared/data"


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    """The example runs as a script would, in this process (torch is imported once), in a temporary folder."""
    text = (REPO / "docs" / "api.md").read_text()
    after = text[text.index(RUN_MARKER) + len(RUN_MARKER):]
    block = FENCE.search(after)
    assert block and block.group(3) == "python"
    script = tmp_path / "api_example.py"
    script.write_text(block.group(4))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the example's mkdtemp lands here
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "samples (4, 1, 28, 28)" in printed and "epsilon after 5 rounds 8.00" in printed, printed
    assert list(tmp_path.glob("medfed-api-*/api-example/checkpoints/latest.pt"))
