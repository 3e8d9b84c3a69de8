import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from medfed.cli import app, main


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


def test_config_shows_descriptions_and_allowed_values():
    result = CliRunner().invoke(app, ["config", "model"])
    assert result.exit_code == 0
    assert "model.preset = 'tiny'" in result.output and "one of pico, nano" in result.output
    assert "train.lr" not in result.output


def test_version():
    from medfed import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"medfed {__version__}"


@pytest.fixture
def failing_command():
    """A `medfed boom` command that raises what the test asks for (removed afterwards)."""
    raised: list[BaseException] = []

    @app.command("boom", hidden=True)
    def boom() -> None:
        raise raised[0]

    yield raised
    app.registered_commands.pop()


def run_main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["medfed", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def test_unexpected_error_is_one_line_and_a_log_file(failing_command, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MEDFED_LOG_DIR", str(tmp_path / "logs"))
    failing_command.append(ZeroDivisionError("division by zero"))
    assert run_main(monkeypatch, "boom") == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unexpected ZeroDivisionError: division by zero")
    logs = list((tmp_path / "logs").glob("*.log"))
    assert len(logs) == 1 and str(logs[0]) in lines[0]
    text = logs[0].read_text()
    assert "Traceback" in text and "ZeroDivisionError" in text and "command: medfed boom" in text
    assert logs[0].stat().st_mode & 0o077 == 0


def test_debug_prints_the_traceback(failing_command, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MEDFED_LOG_DIR", str(tmp_path / "logs"))
    failing_command.append(RuntimeError("kaput"))
    assert run_main(monkeypatch, "--debug", "boom") == 1
    assert "Traceback" in capsys.readouterr().err and not (tmp_path / "logs").exists()


def test_ctrl_c_says_interrupted(failing_command, monkeypatch, capsys):
    failing_command.append(KeyboardInterrupt())
    assert run_main(monkeypatch, "boom") == 130
    assert capsys.readouterr().err.strip() == "error: interrupted"


def test_user_errors_and_bad_options_are_one_line_with_status_2(monkeypatch, capsys):
    assert run_main(monkeypatch, "config", "--set", "model.presett=tiny") == 2
    assert capsys.readouterr().err.strip().startswith("error: --set model.presett=tiny: unknown config key")
    assert run_main(monkeypatch, "train", "--lr", "abc") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Invalid value for '--lr'") and "\n" not in err


def test_data_inspect_counts_slices_and_labels_and_lists_every_skipped_path(tmp_path):
    import shutil

    import nibabel
    import numpy as np
    from PIL import Image

    volume = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"  # a real 33x41x25 volume
    shutil.copy(volume, tmp_path / "anatomical.nii")
    for label in ("benign", "malignant"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(tmp_path / label / "a.png")
    (tmp_path / "zero.nii.gz").write_bytes(b"")
    (tmp_path / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    result = CliRunner().invoke(app, ["data", "inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "nifti: 1 file(s), 25 slice(s) along axis 2" in result.output
    assert "labels (subfolders): benign (1), malignant (1)" in result.output
    assert "zero.nii.gz (nifti): cannot read as NIfTI" in result.output
    assert "gone.dcm: dangling symbolic link" in result.output
    assert "nvImageCodec" not in result.output


def test_config_file_option_reads_a_run_toml(tmp_path):
    (tmp_path / "run.toml").write_text('[model]\npreset = "micro"\n')
    result = CliRunner().invoke(app, ["config", "model.preset", "--config", str(tmp_path / "run.toml")])
    assert result.exit_code == 0 and "model.preset = 'micro'" in result.output
