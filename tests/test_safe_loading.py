"""Safe loading: no pickle is ever unpickled without an explicit opt-in, no remote code, no network for files."""

from __future__ import annotations

import ast
import pickle
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "vlalign"
# The one place allowed to unpickle: converting OpenAI's dVAE encoder.pkl, behind allow_pickle=True.
PICKLE_OPT_IN = {("objectives/image_targets.py", "convert_dvae_pickle")}


def _sources() -> list[tuple[str, ast.Module]]:
    return [(str(path.relative_to(SRC)), ast.parse(path.read_text(), str(path))) for path in sorted(SRC.rglob("*.py"))]


def _enclosing_functions(tree: ast.Module) -> dict[ast.AST, str]:
    owner: dict[ast.AST, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in ast.walk(node):
                owner.setdefault(child, node.name)  # ast.walk is breadth first: the outermost function wins
    return owner


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else keyword.value
    return None


def test_every_torch_load_is_weights_only_except_the_dvae_opt_in() -> None:
    unsafe, opt_ins = [], []
    for name, tree in _sources():
        owners = _enclosing_functions(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            function = _dotted(node.func)
            if function in ("torch.load", "torch.serialization.load"):
                if _keyword(node, "weights_only") is True:
                    continue
                where = (name, owners.get(node, "<module>"))
                (opt_ins if where in PICKLE_OPT_IN else unsafe).append(f"{name}:{node.lineno} in {where[1]}")
            elif function in ("pickle.load", "pickle.loads", "dill.load", "joblib.load", "numpy.load", "np.load"):
                if function.endswith("np.load") or function == "numpy.load":
                    if _keyword(node, "allow_pickle") is not True:
                        continue
                unsafe.append(f"{name}:{node.lineno}: {function}")
    assert unsafe == [], f"unpickling without weights_only=True: {unsafe}"
    assert len(opt_ins) == 1, opt_ins


def test_dvae_conversion_refuses_to_unpickle_without_the_opt_in(tmp_path: Path) -> None:
    from vlalign.objectives.image_targets import convert_dvae_pickle

    with pytest.raises(PermissionError, match="allow_pickle"):
        convert_dvae_pickle(tmp_path / "encoder.pkl", tmp_path / "out.safetensors")


def test_no_remote_code_and_only_local_hub_loads() -> None:
    problems = []
    for name, tree in _sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            if _keyword(node, "trust_remote_code") not in (None, False):
                problems.append(f"{name}:{node.lineno}: trust_remote_code is not False")
            if _dotted(node.func).endswith("from_pretrained") and _keyword(node, "local_files_only") is not True:
                problems.append(f"{name}:{node.lineno}: from_pretrained without local_files_only=True")
            if _dotted(node.func).split(".")[-1] in (
                "hf_hub_download",
                "snapshot_download",
                "load_state_dict_from_url",
            ):
                problems.append(f"{name}:{node.lineno}: downloads")
    assert problems == []
    text = "\n".join(path.read_text() for path in SRC.rglob("*.py"))
    assert "trust_remote_code=True" not in text


class _Payload:
    """Unpickling this would call ``Path.touch`` on a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))


def _loaders() -> dict[str, Callable[[Path], object]]:
    from vlalign.weights.reading import read_state_dict
    from vlalign.weights.safe_loading import load_state_dict_file

    return {"load_state_dict_file": load_state_dict_file, "read_state_dict": read_state_dict}


TORCH_ADVICE = ("weights_only=False", "`weights_only` set to `False`", "weights_only set to False")


def _assert_names_file_without_unsafe_advice(message: str, path: Path) -> None:
    assert str(path) in message, message
    assert not any(advice in message for advice in TORCH_ADVICE), message


@pytest.mark.parametrize("loader", ["load_state_dict_file", "read_state_dict"])
def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path: Path, loader: str) -> None:
    from vlalign.errors import InputFileError

    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Payload(marker)}, path)
    with pytest.raises(InputFileError, match="refused.*Unsupported global") as refused:
        _loaders()[loader](path)
    _assert_names_file_without_unsafe_advice(str(refused.value), path)
    assert not marker.exists(), "loading must not run code from the file"


def _write_bad_weight_file(kind: str, directory: Path, marker: Path) -> Path:
    """One unusable weight file of the given kind."""
    from safetensors.torch import save_file

    random_bytes = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    if kind == "empty-safetensors":
        path = directory / "empty.safetensors"
        path.write_bytes(b"")
    elif kind == "garbage-safetensors":  # safetensors reads the first 8 bytes as a huge header length
        path = directory / "garbage.safetensors"
        path.write_bytes(bytes(random_bytes.tolist()))
    elif kind == "truncated-safetensors":
        path = directory / "cut.safetensors"
        save_file({"w": torch.ones(64, 64)}, str(path))
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "empty-ckpt":
        path = directory / "empty.ckpt"
        path.write_bytes(b"")
    elif kind == "random-bytes-ckpt":
        path = directory / "random.ckpt"
        path.write_bytes(bytes(random_bytes.tolist()))
    elif kind == "text-file-pth":
        path = directory / "notes.pth"
        path.write_text("these are not weights\n" * 20)
    elif kind == "truncated-ckpt":
        path = directory / "cut.ckpt"
        torch.save({"state_dict": {"w": torch.ones(64, 64)}}, path)
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "plain-pickle-with-code":
        path = directory / "model.bin"
        path.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    elif kind == "safetensors-named-bin":
        path = directory / "weights.bin"
        save_file({"w": torch.ones(2)}, str(path))
    else:
        raise AssertionError(kind)
    return path


BAD_WEIGHT_FILES = {
    "empty-safetensors": "empty",
    "garbage-safetensors": "not a readable safetensors file",
    "truncated-safetensors": "not a readable safetensors file",
    "empty-ckpt": "empty",
    "random-bytes-ckpt": "not a PyTorch checkpoint",
    "text-file-pth": "not a PyTorch checkpoint",
    "truncated-ckpt": "damaged or truncated PyTorch checkpoint",
    "plain-pickle-with-code": "refused: a plain Python pickle",
    "safetensors-named-bin": "safetensors file without the .safetensors extension",
}


@pytest.mark.parametrize("kind", sorted(BAD_WEIGHT_FILES))
@pytest.mark.parametrize("loader", ["load_state_dict_file", "read_state_dict"])
def test_an_unusable_weight_file_is_named_with_what_it_should_be(tmp_path: Path, kind: str, loader: str) -> None:
    from vlalign.errors import InputFileError

    marker = tmp_path / "code-ran"
    path = _write_bad_weight_file(kind, tmp_path, marker)
    with pytest.raises(InputFileError) as refused:
        _loaders()[loader](path)
    message = str(refused.value)
    _assert_names_file_without_unsafe_advice(message, path)
    assert BAD_WEIGHT_FILES[kind] in message
    assert "header too" not in message or "safetensors" in message  # never safetensors' bare header error
    assert not marker.exists()


def test_init_from_an_unusable_file_names_it(tmp_path: Path) -> None:
    """The recipe's ``init_from`` reads through the same reader: an empty file is named, not 'header too small'."""
    from vlalign.errors import InputFileError
    from vlalign.weights.safe_loading import load_init_weights

    path = _write_bad_weight_file("empty-safetensors", tmp_path, tmp_path / "marker")
    with pytest.raises(InputFileError, match="empty") as refused:
        load_init_weights(torch.nn.Linear(2, 2), path)
    _assert_names_file_without_unsafe_advice(str(refused.value), path)


def test_a_plain_tensor_checkpoint_still_loads(tmp_path: Path) -> None:
    from vlalign.weights.safe_loading import load_state_dict_file

    path = tmp_path / "fine.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    assert torch.equal(load_state_dict_file(path)["w"], torch.ones(2))


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every attempt to open a connection is recorded and refused."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.mark.parametrize("name", ["bert-base-uncased", "google-bert/bert-base-uncased", "missing/tokenizer/dir"])
def test_missing_tokenizer_path_never_reaches_the_hub(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[object]
) -> None:
    import transformers

    from vlalign.data.tokenization import load_tokenizer

    hub_calls: list[object] = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: hub_calls.append(a))
    monkeypatch.chdir(tmp_path)  # a relative hub-style name must not resolve to a local folder by accident
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer(name)
    assert hub_calls == [] and no_network == []


def test_existing_tokenizer_loads_locally_only(
    synth_data: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[object]
) -> None:
    import transformers

    from vlalign.data.tokenization import load_tokenizer

    seen: list[dict[str, object]] = []
    original = transformers.AutoTokenizer.from_pretrained

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    tokenizer = load_tokenizer(synth_data / "tokenizer")
    assert len(tokenizer) > 0 and no_network == []
    assert seen == [{"local_files_only": True, "trust_remote_code": False}]


# -- --ckpt_path ------------------------------------------------------------------------------------------------------
def _lightning_like_checkpoint(path: Path) -> Path:
    """What a vlalign Lightning checkpoint holds at the top level (config dataclasses in the hyper-parameters)."""
    from vlalign.models.vision import VisionConfig

    torch.save(
        {"state_dict": {"w": torch.ones(2)}, "global_step": 3, "hyper_parameters": {"vision": VisionConfig()}}, path
    )
    return path


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/last.ckpt", "https://host/x.ckpt", "s3://bucket/run/last.ckpt", "gs://b/x.ckpt",
            "registry:my-model:latest"],
)  # fmt: skip
def test_resume_refuses_remote_checkpoints_and_says_to_download(url: str, no_network: list[object]) -> None:
    from vlalign.errors import InputFileError
    from vlalign.weights.safe_loading import check_resume_checkpoint

    with pytest.raises(InputFileError, match="Download it first") as refused:
        check_resume_checkpoint(url)
    assert url in str(refused.value) and "local path" in str(refused.value)
    assert no_network == []


def test_resume_accepts_a_local_lightning_checkpoint_also_as_a_file_url(tmp_path: Path) -> None:
    from vlalign.weights.safe_loading import check_resume_checkpoint

    path = _lightning_like_checkpoint(tmp_path / "last.ckpt")
    check_resume_checkpoint(path)
    check_resume_checkpoint(str(path))
    check_resume_checkpoint(f"file://{path}")
    for keyword in ("last", "best", "hpc"):  # resolved by Lightning among the run's local checkpoints
        check_resume_checkpoint(keyword)


def test_resume_refuses_safetensors_and_points_to_init_from(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from vlalign.errors import InputFileError
    from vlalign.weights.safe_loading import check_resume_checkpoint

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(InputFileError, match="--ckpt_path resumes a Lightning .ckpt") as refused:
        check_resume_checkpoint(path)
    assert f"--model.init_from {path}" in str(refused.value)


@pytest.mark.parametrize("kind", ["random-bytes-ckpt", "empty-ckpt", "truncated-ckpt", "text-file-pth"])
def test_resume_refuses_unreadable_files_naming_them(tmp_path: Path, kind: str) -> None:
    from vlalign.errors import InputFileError
    from vlalign.weights.safe_loading import check_resume_checkpoint

    path = _write_bad_weight_file(kind, tmp_path, tmp_path / "marker")
    with pytest.raises(InputFileError, match="--ckpt_path") as refused:
        check_resume_checkpoint(path)
    _assert_names_file_without_unsafe_advice(str(refused.value), path)


def test_resume_refuses_a_checkpoint_holding_code_without_running_it(tmp_path: Path) -> None:
    from vlalign.errors import InputFileError
    from vlalign.weights.safe_loading import check_resume_checkpoint

    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 1, "payload": _Payload(marker)}, path)
    with pytest.raises(InputFileError, match="refused.*Unsupported global") as refused:
        check_resume_checkpoint(path)
    _assert_names_file_without_unsafe_advice(str(refused.value), path)
    assert not marker.exists()


def test_resume_refuses_weights_files_missing_paths_and_directories(tmp_path: Path) -> None:
    from vlalign.errors import InputFileError
    from vlalign.weights.safe_loading import check_resume_checkpoint

    reference = tmp_path / "ALBEF.pth"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, reference)
    with pytest.raises(InputFileError, match="not a Lightning checkpoint.*--model.init_from"):
        check_resume_checkpoint(reference)
    with pytest.raises(InputFileError, match="gone.ckpt: does not exist"):
        check_resume_checkpoint(tmp_path / "gone.ckpt")
    _lightning_like_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(InputFileError, match=r"is a directory \(it holds last.ckpt\)"):
        check_resume_checkpoint(tmp_path)


@pytest.mark.parametrize("kind", ["empty-safetensors", "garbage-safetensors", "random-bytes-ckpt", "truncated-ckpt"])
def test_reading_tensor_shapes_of_an_unusable_file_names_it(tmp_path: Path, kind: str) -> None:
    from vlalign.errors import InputFileError
    from vlalign.weights.reading import read_tensor_shapes

    path = _write_bad_weight_file(kind, tmp_path, tmp_path / "marker")
    with pytest.raises(InputFileError, match=BAD_WEIGHT_FILES[kind]) as refused:
        read_tensor_shapes(path)
    _assert_names_file_without_unsafe_advice(str(refused.value), path)


def test_reading_tensor_shapes_reads_headers_of_both_formats(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from vlalign.weights.reading import read_tensor_shapes

    save_file({"a.weight": torch.ones(3, 2)}, str(tmp_path / "w.safetensors"))
    _lightning_like_checkpoint(tmp_path / "run.ckpt")
    assert read_tensor_shapes(tmp_path / "w.safetensors") == {"a.weight": (3, 2)}
    assert read_tensor_shapes(tmp_path / "run.ckpt") == {"w": (2,)}
