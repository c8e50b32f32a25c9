"""The sweep spec: loaded from YAML and checked whole before anything runs (format: :mod:`vlalign.sweep`).

Every problem found is reported together in one :class:`~vlalign.errors.ConfigError` naming the spec file and the
key (``variants.albef.objectives.itx``) with the fix. Checks that need the training CLI (override keys, types,
cross-setting checks of each variant's full config) are in :func:`vlalign.sweep.plan.check_configs`.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlalign.errors import ConfigError

__all__ = [
    "DATA_PATH_KEYS",
    "DataSpec",
    "Evaluation",
    "SlurmSpec",
    "SweepSpec",
    "Variant",
    "WARM_START",
    "WarmStart",
    "load_spec",
    "normalize_overrides",
    "objective_slots",
    "resolve_path",
]

#: The vlalign source checkout (configs/ lives here in a development install).
REPO = Path(__file__).resolve().parents[3]
TOP_KEYS = (
    "name", "description", "base", "reference", "seeds", "steps", "data", "env", "overrides", "variants", "evaluate",
    "headline", "quick", "slurm", "warm_start",
)  # fmt: skip
VARIANT_KEYS = ("description", "objectives", "overlays", "overrides")
WARM_START_KEYS = ("steps", "objectives", "overlays", "overrides")
QUICK_KEYS = ("steps", "seeds", "data", "overrides", "env", "warm_start")
#: The warm-start stage's variant name (its folder ``runs/_warm_start``, its rows in results.csv); a variant name
#: cannot start with ``_``, so it never collides with one.
WARM_START = "_warm_start"
#: Set by the sweep in every variant run when the spec has a warm start.
INIT_FROM = "model.init_from"
#: Explicit data paths: the first four are the pretraining data module's (``data.init_args.<key>``); the hard-negative
#: files feed the ``hardneg`` evaluation, the retrieval files also the ``retrieval`` evaluation.
DATA_PATH_KEYS = ("tokenizer", "train_shards", "val_retrieval", "test_retrieval", "hardneg_val", "hardneg_test")
SPLITS = ("test", "val")
#: Keys the sweep sets itself in every run (steps, seeds, folders): an override of one is refused.
FIT_RESERVED = (
    "seed_everything", "trainer.max_steps", "trainer.max_epochs", "trainer.max_time", "trainer.default_root_dir",
    "trainer.logger.init_args.save_dir", "data.init_args.seed", "ckpt_path", "config",
)  # fmt: skip
EVAL_RESERVED = ("model", "model.init_from", "out", "split", "config", "trainer.default_root_dir",
                 "trainer.logger.init_args.save_dir")  # fmt: skip
SLURM_KEYS = {  # spec key -> submitit AutoExecutor parameter
    "partition": "slurm_partition",
    "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb",
    "timeout_min": "timeout_min",
    "array_parallelism": "slurm_array_parallelism",
    "account": "slurm_account",
    "qos": "slurm_qos",
    "constraint": "slurm_constraint",
    "setup": "slurm_setup",
    "additional_parameters": "slurm_additional_parameters",
    "job_name": "name",
}
DEFAULT_FIT_TAGS = ("train/*_loss", "train/*_accuracy", "val/*")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ON = ("on", "yes", "true", "enabled")
OFF = ("off", "no", "false", "none", "null", "disabled")


@dataclass(frozen=True)
class Variant:
    """One named variant: objective toggles (slot -> settings, ``None`` disables), overlay files, overrides."""

    name: str
    objectives: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    overlays: tuple[Path, ...] = ()
    overrides: tuple[tuple[str, str], ...] = ()
    description: str | None = None


@dataclass(frozen=True)
class WarmStart:
    """The shared first stage: per seed, one run of the base config with these objectives for ``steps`` optimizer
    steps; every variant run of that seed starts from its final ``last.ckpt`` (``--model.init_from``)."""

    steps: int
    objectives: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    overlays: tuple[Path, ...] = ()
    overrides: tuple[tuple[str, str], ...] = ()

    def as_variant(self) -> Variant:
        """The stage as a variant named :data:`WARM_START` (what builds its command line)."""
        return Variant(WARM_START, self.objectives, self.overlays, self.overrides, "warm start")


@dataclass(frozen=True)
class Evaluation:
    """One measurement after each run: ``kind`` is ``fit`` (TensorBoard scalars) or a registered task name."""

    name: str
    kind: str
    config: Path | None = None
    split: str = "test"
    overrides: tuple[tuple[str, str], ...] = ()
    tags: tuple[str, ...] = DEFAULT_FIT_TAGS
    average_last: int = 1
    metrics: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataSpec:
    """Synthetic data written once into the sweep folder (``synth``: write_synthetic settings), or explicit paths."""

    synth: dict[str, Any] | None = None
    paths: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SlurmSpec:
    """submitit settings: ``cluster`` (``slurm``, or ``local`` to run the array as local processes) and the
    AutoExecutor parameters."""

    cluster: str = "slurm"
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepSpec:
    """A checked sweep spec (``--quick`` already merged in when asked for)."""

    path: Path
    name: str
    base: tuple[Path, ...]
    variants: dict[str, Variant]
    reference: str
    seeds: tuple[int, ...]
    steps: int
    data: DataSpec
    overrides: tuple[tuple[str, str], ...]
    env: dict[str, str]
    evaluate: tuple[Evaluation, ...]
    headline: tuple[str, ...]
    slurm: SlurmSpec
    quick: bool
    description: str | None
    raw: dict[str, Any]
    warm_start: WarmStart | None = None

    def default_out(self) -> Path:
        """``sweeps/<name>`` (``sweeps/<name>_quick`` for ``--quick``), relative to the working directory."""
        return Path("sweeps") / (f"{self.name}_quick" if self.quick else self.name)


# -- helpers ---------------------------------------------------------------------------------------------------------
def objective_slots() -> tuple[str, ...]:
    """The pretraining recipe's objective slots: the registered built-in objectives, in registry order."""
    import vlalign.objectives  # noqa: F401 - registers the built-in objectives
    from vlalign.objectives.base import builtin_objectives

    return builtin_objectives()


def resolve_path(value: Any, key: str, errors: list[str], search: tuple[Path, ...] = ()) -> Path | None:
    """An existing file for ``value``: absolute, else under the working directory, the checkout, then ``search``."""
    if not isinstance(value, str) or not value.strip():
        errors.append(f"{key}: expected a file path, got {_show(value)}")
        return None
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO / path, *(d / path for d in search)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    errors.append(f"{key}: {value} does not exist (looked for {looked})")
    return None


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _suggest(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_keys(mapping: dict[str, Any], allowed: tuple[str, ...] | list[str], where: str) -> list[str]:
    return [
        f"{where}{key}: unknown key{_suggest(str(key), allowed)}; the keys are: {', '.join(allowed)}"
        for key in mapping
        if key not in allowed
    ]


def _cli_value(value: Any) -> str:
    """A YAML value as the training CLI reads it on the command line."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def normalize_overrides(value: Any, key: str, errors: list[str]) -> tuple[tuple[str, str], ...]:
    """Overrides as ``(dotted.key, value)`` pairs, from a mapping ``{dotted.key: value}`` or a list of CLI-style items
    (``"--key value"``, ``"--key=value"``, or ``"--key"`` followed by its value as the next item)."""
    if value is None:
        return ()
    pairs: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for name, item in value.items():
            pairs.append((str(name).removeprefix("--"), _cli_value(item)))
    elif isinstance(value, (list, tuple)):
        items = [item if isinstance(item, str) else _cli_value(item) for item in value]
        i = 0
        while i < len(items):
            item = items[i].strip()
            if not item.startswith("--"):
                errors.append(
                    f"{key}[{i}]: {item!r} is not an option; write '--dotted.key value' (or a mapping dotted.key: value)"
                )
                i += 1
                continue
            if "=" in item.split()[0]:
                name, _, rest = item.partition("=")
                pairs.append((name[2:], _unquote(rest.strip())))
            elif len(item.split(None, 1)) == 2:
                name, rest = item.split(None, 1)
                pairs.append((name[2:], _unquote(rest.strip())))
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                pairs.append((item[2:], items[i + 1]))
                i += 1
            else:
                errors.append(f"{key}[{i}]: {item} has no value; write '{item} VALUE'")
            i += 1
    else:
        errors.append(f"{key}: expected a list of '--key value' strings or a mapping key: value, got {_show(value)}")
    for name, _ in pairs:
        if not name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
            errors.append(f"{key}: {name!r} is not a config key (dotted names such as model.itc.queue_size)")
    return tuple(pairs)


def _unquote(text: str) -> str:
    """``'a b'`` -> ``a b``: the quotes a shell would remove around a whole value."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _check_reserved(pairs: tuple[tuple[str, str], ...], reserved: tuple[str, ...], key: str, errors: list[str]) -> None:
    for name, _ in pairs:
        if name in reserved:
            errors.append(
                f"{key}: --{name} is set by the sweep for every run (steps:, seeds:, the run folders); remove it"
            )


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (
            _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


# -- the sections ----------------------------------------------------------------------------------------------------
def _objectives(value: Any, key: str, slots: tuple[str, ...], errors: list[str]) -> dict[str, dict | None]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(f"{key}: expected a mapping objective: on | off | {{settings}}, got {_show(value)}")
        return {}
    toggles: dict[str, dict | None] = {}
    for name, setting in value.items():
        if name not in slots:
            errors.append(
                f"{key}.{name}: unknown objective{_suggest(str(name), slots)}; the objectives are: {', '.join(slots)} "
                "(objectives from plug-ins: --model.extra_objectives in overrides)"
            )
            continue
        if isinstance(setting, bool):
            toggles[name] = {} if setting else None
        elif setting is None or (isinstance(setting, str) and setting.strip().lower() in OFF):
            toggles[name] = None
        elif isinstance(setting, str) and setting.strip().lower() in ON:
            toggles[name] = {}
        elif isinstance(setting, dict):
            toggles[name] = dict(setting)
        else:
            errors.append(f"{key}.{name}: expected on, off or a mapping of settings, got {_show(setting)}")
    return toggles


def _overlay(value: Any, key: str, errors: list[str]) -> Path | None:
    if isinstance(value, str) and "/" not in value and not value.endswith((".yaml", ".yml")):
        ablations = Path("configs") / "ablations" / f"{value}.yaml"
        for candidate in (Path.cwd() / ablations, REPO / ablations):
            if candidate.is_file():
                return candidate.resolve()
        known = sorted(p.stem for p in (REPO / "configs" / "ablations").glob("*.yaml"))
        errors.append(
            f"{key}: no overlay named {value!r} in configs/ablations/{_suggest(value, known)}; "
            f"the overlays are: {', '.join(known) or '(none)'}; or give a path"
        )
        return None
    return resolve_path(value, key, errors)


def _variants(value: Any, slots: tuple[str, ...], errors: list[str]) -> dict[str, Variant]:
    if not isinstance(value, dict) or not value:
        errors.append(f"variants: expected a mapping of named variants (name: {{objectives: ...}}), got {_show(value)}")
        return {}
    variants = {}
    for name, body in value.items():
        key = f"variants.{name}"
        if not isinstance(name, str) or not NAME.match(name):
            errors.append(f"{key}: a variant name is a folder name: letters, digits, '_', '.', '-'")
            continue
        body = {} if body is None else body
        if not isinstance(body, dict):
            errors.append(f"{key}: expected a mapping with {', '.join(VARIANT_KEYS)}, got {_show(body)}")
            continue
        errors += _unknown_keys(body, VARIANT_KEYS, f"{key}.")
        objectives, overlays, overrides = _run_settings(body, key, slots, errors)
        description = body.get("description")
        variants[name] = Variant(
            name=name,
            objectives=objectives,
            overlays=overlays,
            overrides=overrides,
            description=str(description) if description is not None else None,
        )
    return variants


def _run_settings(
    body: dict[str, Any], key: str, slots: tuple[str, ...], errors: list[str]
) -> tuple[dict[str, dict | None], tuple[Path, ...], tuple[tuple[str, str], ...]]:
    """``objectives``, ``overlays`` and ``overrides`` of a variant or of the warm start, checked."""
    overlays = body.get("overlays") or []
    overlays = [overlays] if isinstance(overlays, str) else overlays
    if not isinstance(overlays, list):
        errors.append(f"{key}.overlays: expected a list of overlay names or paths, got {_show(overlays)}")
        overlays = []
    paths = [_overlay(item, f"{key}.overlays[{i}]", errors) for i, item in enumerate(overlays)]
    overrides = normalize_overrides(body.get("overrides"), f"{key}.overrides", errors)
    _check_reserved(overrides, FIT_RESERVED, f"{key}.overrides", errors)
    objectives = _objectives(body.get("objectives"), f"{key}.objectives", slots, errors)
    return objectives, tuple(p for p in paths if p is not None), overrides


def _warm_start(value: Any, slots: tuple[str, ...], errors: list[str]) -> WarmStart | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        errors.append(
            f"warm_start: expected a mapping with {', '.join(WARM_START_KEYS)} (steps: N, objectives: {{itc: on, "
            f"...}}), got {_show(value)}"
        )
        return None
    errors += _unknown_keys(value, WARM_START_KEYS, "warm_start.")
    if "steps" not in value:
        errors.append("warm_start.steps: missing; give the optimizer steps of the shared stage (an integer >= 1)")
    steps = _steps(value.get("steps", 1), "warm_start.steps", errors)
    objectives, overlays, overrides = _run_settings(value, "warm_start", slots, errors)
    return WarmStart(steps, objectives, overlays, overrides)


def _check_init_from_free(overrides: tuple[tuple[str, str], ...], key: str, errors: list[str]) -> None:
    """With a warm start the sweep sets ``model.init_from`` of every variant run."""
    if any(name == INIT_FROM for name, _ in overrides):
        errors.append(
            f"{key}: --{INIT_FROM} is set by the sweep when it has a warm_start: (each variant starts from its "
            f"seed's warm start); remove it, or give the warm start its starting point in warm_start.overrides"
        )


def _seeds(value: Any, key: str, errors: list[str]) -> tuple[int, ...]:
    seeds = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        errors.append(f"{key}: expected a non-empty list of integer seeds, got {_show(value)}")
        return ()
    if len(set(seeds)) != len(seeds):
        errors.append(f"{key}: seeds repeat: {seeds}")
    return tuple(seeds)


def _steps(value: Any, key: str, errors: list[str]) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        errors.append(f"{key}: expected the number of optimizer steps per run (an integer >= 1), got {_show(value)}")
        return 1
    return value


def _synth_keys() -> tuple[str, ...]:
    from vlalign.data.synth import write_synthetic

    return tuple(p for p in inspect.signature(write_synthetic).parameters if p not in ("out", "progress"))


def _data(value: Any, errors: list[str]) -> DataSpec:
    if value is None:
        return DataSpec()
    if not isinstance(value, dict):
        errors.append(f"data: expected a mapping (synth: {{...}} or paths), got {_show(value)}")
        return DataSpec()
    allowed = ("synth", *DATA_PATH_KEYS)
    errors += _unknown_keys(value, allowed, "data.")
    if "synth" in value:
        others = [k for k in value if k != "synth" and k in allowed]
        if others:
            errors.append(f"data: synth writes every file itself; remove {', '.join(others)} or synth")
        synth = value["synth"] or {}
        if not isinstance(synth, dict):
            errors.append(f"data.synth: expected a mapping of `vlalign data synth` settings, got {_show(synth)}")
            return DataSpec()
        keys = _synth_keys()
        errors += _unknown_keys(synth, keys, "data.synth.")
        for name, item in synth.items():
            if name in keys and (not isinstance(item, int) or isinstance(item, bool)):
                errors.append(f"data.synth.{name}: expected an integer, got {_show(item)}")
        return DataSpec(synth=dict(synth))
    paths: dict[str, str] = {}
    for name in DATA_PATH_KEYS:
        if name not in value:
            continue
        item = value[name]
        if not isinstance(item, str) or not item:
            errors.append(f"data.{name}: expected a path, got {_show(item)}")
            continue
        path = Path(item).expanduser().resolve()
        must_exist = name != "train_shards"  # a brace pattern, checked by the data module
        if must_exist and not path.exists():
            errors.append(f"data.{name}: {path} does not exist")
        paths[name] = str(path)
    return DataSpec(paths=paths)


def _env(value: Any, key: str, errors: list[str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        errors.append(f"{key}: expected a mapping NAME: value of environment variables, got {_show(value)}")
        return {}
    return {k: _cli_value(v) for k, v in value.items()}


def _evaluations(value: Any, errors: list[str]) -> tuple[Evaluation, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        errors.append(f"evaluate: expected a list such as [fit: {{...}}, retrieval: {{...}}], got {_show(value)}")
        return ()
    from vlalign.tasks.registry import tasks

    registered = tasks()
    kinds = ("fit", *registered)
    out: list[Evaluation] = []
    for i, entry in enumerate(value):
        key = f"evaluate[{i}]"
        if isinstance(entry, str):
            entry = {entry: None}
        if not isinstance(entry, dict) or len(entry) != 1:
            errors.append(f"{key}: expected one 'kind: settings' pair (kinds: {', '.join(kinds)}), got {_show(entry)}")
            continue
        ((kind, settings),) = entry.items()
        settings = settings or {}
        if kind not in kinds:
            errors.append(f"{key}: unknown measurement {kind!r}{_suggest(str(kind), kinds)}; kinds: {', '.join(kinds)}")
            continue
        if not isinstance(settings, dict):
            errors.append(f"{key}.{kind}: expected a mapping of settings, got {_show(settings)}")
            continue
        name = settings.get("name", kind)
        if not isinstance(name, str) or not NAME.match(name):
            errors.append(f"{key}.{kind}.name: a measurement name is a folder name, got {_show(name)}")
            continue
        metrics = settings.get("metrics") or []
        if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
            errors.append(f"{key}.{kind}.metrics: expected a list of glob patterns, got {_show(metrics)}")
            metrics = []
        where = f"{key}.{kind}."
        if kind == "fit":
            errors += _unknown_keys(settings, ("name", "tags", "average_last", "metrics"), where)
            tags = settings.get("tags", list(DEFAULT_FIT_TAGS))
            if not isinstance(tags, list) or not tags or not all(isinstance(t, str) for t in tags):
                errors.append(f"{where}tags: expected a list of TensorBoard tag patterns, got {_show(tags)}")
                tags = list(DEFAULT_FIT_TAGS)
            last = settings.get("average_last", 1)
            if not isinstance(last, int) or isinstance(last, bool) or last < 1:
                errors.append(f"{where}average_last: expected an integer >= 1, got {_show(last)}")
                last = 1
            out.append(Evaluation(name, kind, tags=tuple(tags), average_last=last, metrics=tuple(metrics)))
            continue
        errors += _unknown_keys(settings, ("name", "config", "split", "overrides", "metrics"), where)
        split = settings.get("split", "test")
        if split not in SPLITS:
            errors.append(f"{where}split: expected one of {', '.join(SPLITS)}, got {_show(split)}")
        config_value = settings.get("config")
        config = (
            resolve_path(config_value, f"{where}config", errors)
            if config_value is not None
            else registered[kind].config_path
        )
        overrides = normalize_overrides(settings.get("overrides"), f"{where}overrides", errors)
        _check_reserved(overrides, EVAL_RESERVED, f"{where}overrides", errors)
        out.append(Evaluation(name, kind, config, split, overrides, metrics=tuple(metrics)))
    names = [e.name for e in out]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"evaluate: two measurements are called {name!r}; give one a `name:`")
    return tuple(out)


def _slurm(value: Any, errors: list[str]) -> SlurmSpec:
    if value is None:
        return SlurmSpec()
    if not isinstance(value, dict):
        errors.append(f"slurm: expected a mapping of job settings, got {_show(value)}")
        return SlurmSpec()
    allowed = ("cluster", *SLURM_KEYS)
    errors += _unknown_keys(value, allowed, "slurm.")
    cluster = value.get("cluster", "slurm")
    if cluster not in ("slurm", "local"):
        errors.append(f"slurm.cluster: expected slurm (or local: the job array as local processes), got {cluster!r}")
    parameters = {SLURM_KEYS[k]: v for k, v in value.items() if k in SLURM_KEYS}
    return SlurmSpec(cluster=str(cluster), parameters=parameters)


# -- loading ---------------------------------------------------------------------------------------------------------
def load_spec(path: str | Path, quick: bool = False) -> SweepSpec:
    """Read and check a sweep spec; ``quick`` merges its ``quick:`` section over the rest.

    Raises:
        ConfigError: every problem found, each naming its key and the fix.
    """
    import yaml

    spec_path = Path(path).expanduser()
    if not spec_path.is_file():
        raise ConfigError(f"--config: sweep spec {spec_path} does not exist")
    try:
        raw = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{spec_path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{spec_path}: a sweep spec is a YAML mapping (base:, variants:, seeds:, steps:, ...)")
    errors: list[str] = []
    errors += _unknown_keys(raw, TOP_KEYS, "")
    quick_section = raw.get("quick") or {}
    if not isinstance(quick_section, dict):
        errors.append(f"quick: expected a mapping with {', '.join(QUICK_KEYS)}, got {_show(quick_section)}")
        quick_section = {}
    errors += _unknown_keys(quick_section, QUICK_KEYS, "quick.")
    _seeds(quick_section.get("seeds", [0]), "quick.seeds", errors)
    _steps(quick_section.get("steps", 1), "quick.steps", errors)
    quick_warm = quick_section.get("warm_start")
    if quick_warm is not None:
        if not isinstance(quick_warm, dict):
            errors.append(f"quick.warm_start: expected a mapping such as {{steps: 60}}, got {_show(quick_warm)}")
            quick_warm = None
        else:
            errors += _unknown_keys(quick_warm, WARM_START_KEYS, "quick.warm_start.")
            _steps(quick_warm.get("steps", 1), "quick.warm_start.steps", errors)
            if not isinstance(raw.get("warm_start"), dict):
                errors.append("quick.warm_start: the spec has no warm_start: section for it to change; add one")
                quick_warm = None
    _check_reserved(
        normalize_overrides(quick_section.get("overrides"), "quick.overrides", errors),
        FIT_RESERVED,
        "quick.overrides",
        errors,
    )
    effective = dict(raw)
    if quick:
        for key in ("steps", "seeds"):
            if key in quick_section:
                effective[key] = quick_section[key]
        if "data" in quick_section:
            effective["data"] = _deep_merge(raw.get("data") or {}, quick_section["data"] or {})
        if "env" in quick_section:
            effective["env"] = {**(raw.get("env") or {}), **(quick_section["env"] or {})}
        if quick_warm:
            effective["warm_start"] = _deep_merge(raw["warm_start"], quick_warm)
    for required in ("base", "variants", "steps"):
        if required not in effective:
            errors.append(f"{required}: missing (see the format in `vlalign sweep --help`)")
    base_value = effective.get("base")
    base_values = base_value if isinstance(base_value, list) else [base_value]
    base = [resolve_path(item, "base", errors) for item in base_values] if "base" in effective else []
    slots = objective_slots()
    variants = _variants(effective.get("variants"), slots, errors)
    reference = effective.get("reference", next(iter(variants), ""))
    if variants and reference not in variants:
        errors.append(
            f"reference: {reference!r} is not a variant{_suggest(str(reference), list(variants))}; "
            f"the variants are: {', '.join(variants)}"
        )
    overrides = normalize_overrides(effective.get("overrides"), "overrides", errors)
    if quick:
        overrides += normalize_overrides(quick_section.get("overrides"), "quick.overrides", [])
    _check_reserved(overrides, FIT_RESERVED, "overrides", errors)
    warm_start = _warm_start(effective.get("warm_start"), slots, errors)
    if warm_start is not None:
        _check_init_from_free(overrides, "overrides", errors)
        for variant in variants.values():
            _check_init_from_free(variant.overrides, f"variants.{variant.name}.overrides", errors)
    headline = effective.get("headline") or []
    if not isinstance(headline, list) or not all(isinstance(h, str) for h in headline):
        errors.append(f"headline: expected a list of metric keys such as retrieval/itc/r_mean, got {_show(headline)}")
        headline = []
    spec = SweepSpec(
        path=spec_path.resolve(),
        name=str(effective.get("name") or spec_path.stem),
        base=tuple(p for p in base if p is not None),
        variants=variants,
        reference=str(reference),
        seeds=_seeds(effective.get("seeds", [0]), "seeds", errors),
        steps=_steps(effective.get("steps", 1), "steps", errors),
        data=_data(effective.get("data"), errors),
        overrides=overrides,
        env=_env(effective.get("env"), "env", errors),
        evaluate=_evaluations(effective.get("evaluate"), errors),
        headline=tuple(headline),
        slurm=_slurm(effective.get("slurm"), errors),
        quick=quick,
        description=str(effective["description"]) if effective.get("description") else None,
        raw=effective,
        warm_start=warm_start,
    )
    if not NAME.match(spec.name):
        errors.append(f"name: {spec.name!r} is used as a folder name: letters, digits, '_', '.', '-'")
    if errors:
        listing = "\n".join(f"  - {error}" for error in errors)
        count = f"{len(errors)} problem{'s' * (len(errors) > 1)}"
        raise ConfigError(f"invalid sweep spec {spec_path} ({count}):\n{listing}")
    return spec
