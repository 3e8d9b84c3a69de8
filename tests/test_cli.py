import click
import typer
from typer.testing import CliRunner

from medfed.cli import app


def all_command_paths(command: click.Command, prefix=()):
    yield prefix
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from all_command_paths(sub, (*prefix, name))


def test_every_command_has_help():
    root = typer.main.get_command(app)
    paths = list(all_command_paths(root))
    assert ("train",) in paths and ("run",) in paths and ("sample",) in paths
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output
    for path in paths[1:]:
        command = root
        for name in path:
            command = command.commands[name]
        assert command.help, f"medfed {' '.join(path)} has no help text"


def test_config_lists_every_key_and_applies_overrides():
    result = CliRunner().invoke(app, ["config", "--set", "train.lr=0.5"])
    assert result.exit_code == 0
    assert "train.lr = 0.5" in result.output and "federation.rounds = 5" in result.output
