"""Safe loading: no pickle is ever unpickled without an explicit opt-in, no remote code, no network for files."""

from __future__ import annotations

import ast
import pickle
import socket
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


@pytest.mark.parametrize("loader", ["checkpoints.load_state_dict_file", "models.loading.read_state_dict"])
def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path: Path, loader: str) -> None:
    from vlalign.checkpoints import load_state_dict_file
    from vlalign.models.loading import read_state_dict

    load = {"checkpoints.load_state_dict_file": load_state_dict_file, "models.loading.read_state_dict": read_state_dict}
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        load[loader](path)
    assert not marker.exists(), "loading must not run code from the file"


def test_a_plain_tensor_checkpoint_still_loads(tmp_path: Path) -> None:
    from vlalign.checkpoints import load_state_dict_file

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

    from vlalign.tokenization import load_tokenizer

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

    from vlalign.tokenization import load_tokenizer

    seen: list[dict[str, object]] = []
    original = transformers.AutoTokenizer.from_pretrained

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    tokenizer = load_tokenizer(synth_data / "tokenizer")
    assert len(tokenizer) > 0 and no_network == []
    assert seen == [{"local_files_only": True, "trust_remote_code": False}]
