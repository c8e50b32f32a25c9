"""What the `vlalign` command does with mistakes: one ``error:`` block, exit status 2, no traceback (``--debug`` or
``VLALIGN_DEBUG=1`` shows it), and ``--ckpt_path`` never downloading or unpickling a checkpoint."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule

import vlalign.cli.main as cli_main
from vlalign.cli.main import main
from vlalign.cli.train import instantiation_error
from vlalign.errors import ConfigError, InputFileError

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml")
ARGS_WARNING = "LightningCLI's args parameter"


def vlalign(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed command line in a child process (``python -m vlalign``)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "vlalign", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


def error_block(stderr: str) -> str:
    """The ``error:`` block at the end of stderr; fails unless there is exactly one and no traceback."""
    assert stderr.count("error: ") == 1 and "Traceback" not in stderr, stderr
    return stderr[stderr.index("error: ") :]


def test_config_mistake_prints_one_error_block_without_traceback_and_exits_2(cli_data_args: list[str]) -> None:
    """In a child process, as users run it: status 2, one error block naming the key, and no Lightning warning
    about getting both ``args`` and ``sys.argv``."""
    result = vlalign("fit", "--config", TINY, *cli_data_args, "--model.vision.img_size", "60")
    assert result.returncode == 2, result.stderr
    block = error_block(result.stderr)
    assert block.startswith("error: invalid configuration") and "model.vision.img_size (60)" in block
    assert ARGS_WARNING not in result.stderr


@pytest.mark.parametrize("switch", ["flag", "env"])
def test_debug_flag_or_env_shows_the_traceback(
    switch: str, cli_data_args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["fit", "--config", TINY, *cli_data_args, "--model.vision.img_size", "60"]
    if switch == "flag":
        args = ["--debug", *args]
    else:
        monkeypatch.setenv("VLALIGN_DEBUG", "1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err and "error: invalid configuration" in err


def test_missing_file_in_a_data_module_init_is_one_error_block(
    cli_data_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data module refusing a path while it is built: the error names the section and the file, status 2."""
    missing = tmp_path / "no-such-list.json"
    assert main(["fit", "--config", TINY, *cli_data_args, "--data.init_args.val_retrieval", str(missing)]) == 2
    block = error_block(capsys.readouterr().err)
    assert "data" in block and str(missing) in block and "val_retrieval" in block


class RangeCheckedRecipe(LightningModule):
    def __init__(self, momentum: float) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"model.momentum must be in [0, 1), got {momentum}")


def test_range_check_raised_while_building_becomes_a_config_error_naming_the_section() -> None:
    """jsonargparse wraps what an ``__init__`` raised; the innermost error decides, with the class that raised it."""
    try:
        try:
            RangeCheckedRecipe(momentum=1.5)
        except ValueError as error:
            raise ValueError("Does not validate against any of the Union subtypes") from error
    except ValueError as wrapped:
        converted = instantiation_error(wrapped)
    assert isinstance(converted, ConfigError)
    assert str(converted) == "model (RangeCheckedRecipe): model.momentum must be in [0, 1), got 1.5"

    try:
        raise TypeError("a bug, not a setting")
    except TypeError as bug:
        assert instantiation_error(bug) is None  # bugs keep their traceback


def test_user_error_from_a_tool_is_one_error_block(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def convert(args: list[str]) -> None:
        raise InputFileError("captions.json: not a JSON list (line 1); give an ALBEF-style caption list")

    monkeypatch.setattr(cli_main, "_tools", lambda: {"data": convert})
    assert main(["data", "convert"]) == 2
    assert (
        capsys.readouterr().err == "error: captions.json: not a JSON list (line 1); give an ALBEF-style caption list\n"
    )


# -- --ckpt_path and --weights_only -----------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and records every request path."""

    requests: list[str]

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass


@pytest.fixture()
def malicious_checkpoint_server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """(URL of a checkpoint whose unpickling writes a marker file, that marker, the requests the server got)."""
    served = tmp_path / "served"
    served.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {}, "global_step": 0, "payload": Payload(marker)}, served / "last.ckpt")
    torch.load(served / "last.ckpt", weights_only=False)  # the payload is live: unpickling runs it
    assert marker.exists()
    marker.unlink()

    requests: list[str] = []
    handler = type("Handler", (RecordingHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/last.ckpt", marker, requests
    finally:
        server.shutdown()
        server.server_close()


def test_remote_checkpoint_is_refused_before_download_and_no_code_runs(
    malicious_checkpoint_server: tuple[str, Path, list[str]], cli_data_args: list[str]
) -> None:
    url, marker, requests = malicious_checkpoint_server
    result = vlalign("fit", "--config", TINY, *cli_data_args, "--trainer.max_steps", "1", "--ckpt_path", url)
    assert result.returncode == 2, result.stderr
    block = error_block(result.stderr)
    assert url in block and "Download it first" in block and "local path" in block
    assert not marker.exists() and requests == []  # nothing downloaded, nothing unpickled


@pytest.mark.parametrize("command", ["validate", "test"])
def test_validate_and_test_refuse_a_remote_checkpoint_too(
    command: str,
    malicious_checkpoint_server: tuple[str, Path, list[str]],
    cli_data_args: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, marker, requests = malicious_checkpoint_server
    assert main([command, "--config", TINY, *cli_data_args, "--ckpt_path", url]) == 2
    assert "remote checkpoints are not loaded" in error_block(capsys.readouterr().err)
    assert not marker.exists() and requests == []


def test_weights_only_false_is_refused(
    cli_data_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "global_step": 0}, saved)
    args = ["fit", "--config", TINY, *cli_data_args, "--ckpt_path", str(saved), "--weights_only", "false"]
    assert main(args) == 2
    block = error_block(capsys.readouterr().err)
    assert block.startswith("error: --weights_only false") and "weights_only=True" in block


def test_safetensors_file_as_ckpt_path_names_the_file_and_points_to_init_from(
    cli_data_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights))
    assert main(["validate", "--config", TINY, *cli_data_args, "--ckpt_path", str(weights)]) == 2
    block = error_block(capsys.readouterr().err)
    assert str(weights) in block and "--ckpt_path resumes a Lightning .ckpt" in block
    assert f"--model.init_from {weights}" in block and "weights_only=False" not in block
