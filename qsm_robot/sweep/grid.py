"""The sweep spec: tasks x presets x seeds x a grid of TrainConfig overrides.

A sweep is written down as a :class:`SweepSpec` (what runs: it names the trials) and
:class:`Resources` (how they run: CPUs and GPUs per trial, retries). Both come from the command
line or a small YAML/JSON sweep file (docs/SWEEP.md)::

    tasks: [cartpole-swingup, walker-walk]
    presets: [fast]
    seeds: [0, 1, 2]
    set: {steps: 100000, eval_every: 5000}     # every trial
    grid: {q_grad_scale: [30, 50]}             # one trial per combination (x tasks x presets x seeds)
    resources: {cpus_per_trial: 1, gpus_per_trial: 0, max_failures: 3}

Everything is checked before any trial starts (:func:`expand`): an unknown task, preset or
field, a value of the wrong type (``hidden_dim: wide``) and an invalid config each raise
:class:`SweepError` naming the field. Each trial is an ordinary qsm-train run directory,
``SWEEP_DIR/trials/<task>__<preset>__seed<seed>[__<field>=<value>,...]``; the sweep folder's
``sweep.json`` records the spec, and a different spec is refused there (:func:`check_sweep_dir`).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsm_robot.config import PRESETS, ConfigError, TrainConfig, preset_config

SWEEP_FILE = "sweep.json"
TRIALS_DIR = "trials"
SPEC_VERSION = 1

#: TrainConfig fields that a sweep sets itself, and why they are not overrides.
SET_BY_SWEEP = {
    "task": "list tasks under 'tasks' (--tasks)",
    "seed": "list seeds under 'seeds' (--seeds)",
    "preset": "list presets under 'presets' (--presets)",
    "run_dir": "each trial's run directory is SWEEP_DIR/trials/<trial name>",
    "threads": "a trial's threads follow its CPUs (--cpus-per-trial)",
    "device": "a trial runs on CUDA when it is given GPUs (--gpus-per-trial), else on the CPU",
}


class SweepError(ValueError):
    """Bad sweep input; the message names the field (or sweep key) at fault."""


@dataclass
class SweepSpec:
    """What a sweep runs: every combination of task, preset, seed and grid point is one trial."""

    tasks: list[str] = field(default_factory=list)
    """dm_control tasks as domain-task (cartpole-swingup, walker-walk, ...)."""
    presets: list[str] = field(default_factory=lambda: ["reference"])
    """TrainConfig presets (qsm_robot.config.PRESETS); each trial starts from one."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds; every task x preset x grid point runs once per seed."""
    set: dict[str, Any] = field(default_factory=dict)
    """TrainConfig overrides applied to every trial (e.g. steps, eval_every)."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """TrainConfig fields and the values to try: one trial per combination."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Resources:
    """How a sweep's trials run on Ray; not part of the sweep's identity (may change on resume)."""

    cpus_per_trial: float = 1.0
    """CPUs Ray reserves for each trial (fractions allowed); its torch/BLAS threads = max(1, floor)."""
    gpus_per_trial: float = 0.0
    """GPUs per trial (fractions allowed: 0.25 runs four trials on one GPU); > 0 trains on CUDA."""
    max_failures: int = 3
    """Retries of a trial that dies, each from its latest checkpoint (-1: without limit)."""
    max_concurrent: int = 0
    """Trials running at once; 0: as many as the resources allow."""

    def validate(self) -> "Resources":
        if not self.cpus_per_trial > 0:
            raise SweepError(f"cpus_per_trial: must be > 0, got {self.cpus_per_trial!r}")
        if not self.gpus_per_trial >= 0:
            raise SweepError(f"gpus_per_trial: must be >= 0, got {self.gpus_per_trial!r}")
        if self.max_failures < -1:
            raise SweepError(f"max_failures: must be >= -1, got {self.max_failures!r}")
        if self.max_concurrent < 0:
            raise SweepError(f"max_concurrent: must be >= 0, got {self.max_concurrent!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Trial:
    """One training run of the sweep: its name, run directory and validated config."""

    name: str
    run_dir: Path
    config: TrainConfig
    point: dict[str, Any]
    """The grid values of this trial (empty without a grid)."""


# --- values ------------------------------------------------------------------------------------
_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def field_name(name: str) -> str:
    """The TrainConfig field for ``name`` (``hidden-dim`` or ``hidden_dim``), or SweepError."""
    key = str(name).strip().replace("-", "_")
    if key in SET_BY_SWEEP:
        raise SweepError(f"{key}: set by the sweep, not an override: {SET_BY_SWEEP[key]}")
    if key not in _FIELD_TYPES:
        close = difflib.get_close_matches(key, list(_FIELD_TYPES), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SweepError(f"{key}: unknown TrainConfig field{hint}; see qsm-train --help")
    return key


def parse_value(name: str, value: Any) -> Any:
    """``value`` (a command-line string or a YAML/JSON value) as the type of field ``name``.

    Raises SweepError naming the field when it is not of that type (``hidden_dim='wide'``).
    """
    key = field_name(name)
    kind = _FIELD_TYPES[key]
    optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        kind = next(t for t in typing.get_args(kind) if t is not type(None))

    def wrong(expected: str) -> SweepError:
        return SweepError(f"{key}: expected {expected}, got {value!r}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise wrong("true or false")
    if kind is int:
        if isinstance(value, bool):
            raise wrong("an integer")
        if isinstance(value, int):
            return value
        number = _number(value)
        if number is None or not float(number).is_integer():
            raise wrong("an integer")
        return int(number)
    if kind is float:
        number = None if isinstance(value, bool) else _number(value)
        if number is None:
            raise wrong("a number")
        return float(number)
    if kind is str:
        if isinstance(value, str):
            return value
        raise wrong("a string")
    raise SweepError(f"{key}: fields of type {kind} cannot be swept")  # pragma: no cover


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip().replace("_", ""))
        except ValueError:
            return None
    return None


def parse_assignment(text: str, option: str) -> tuple[str, str]:
    """``FIELD=VALUE`` from the command line -> (field, raw value)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise SweepError(f"{option}: expected FIELD=VALUE, got {text!r}")
    return name.strip(), value.strip()


# --- the spec ----------------------------------------------------------------------------------
def _as_list(value: Any, key: str) -> list[Any]:
    if value is None:
        raise SweepError(f"{key}: must not be empty")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise SweepError(f"{key}: must not be empty")
    return items


def normalize_spec(spec: SweepSpec) -> SweepSpec:
    """Check the spec's shape and give every value its field's type; raise SweepError."""
    tasks = [str(t) for t in _as_list(spec.tasks, "tasks")]
    presets = [str(p) for p in _as_list(spec.presets, "presets")]
    seeds = []
    for s in _as_list(spec.seeds, "seeds"):
        try:
            seeds.append(parse_int_seed(s))
        except ValueError:
            raise SweepError(f"seeds: expected integers, got {s!r}") from None
    for key, items in (("tasks", tasks), ("presets", presets), ("seeds", seeds)):
        if len(set(items)) != len(items):
            raise SweepError(f"{key}: listed twice: {sorted({x for x in items if items.count(x) > 1})}")
    from qsm_robot.envs.dmc import UnknownTaskError, _split_task

    for task in tasks:
        try:
            _split_task(task)
        except UnknownTaskError as exc:
            raise SweepError(f"task: {exc}") from None
    for preset in presets:
        if preset not in PRESETS:
            raise SweepError(f"preset: unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    if not isinstance(spec.set, dict):
        raise SweepError(f"set: expected a mapping FIELD: VALUE, got {spec.set!r}")
    if not isinstance(spec.grid, dict):
        raise SweepError(f"grid: expected a mapping FIELD: [VALUES], got {spec.grid!r}")
    fixed = {field_name(k): parse_value(k, v) for k, v in spec.set.items()}
    grid: dict[str, list[Any]] = {}
    for k, values in spec.grid.items():
        key = field_name(k)
        if key in fixed:
            raise SweepError(f"{key}: given both in set (one value) and in grid (values to try)")
        parsed = [parse_value(k, v) for v in _as_list(values, f"grid: {key}")]
        if len(set(map(repr, parsed))) != len(parsed):
            raise SweepError(f"{key}: a grid value is listed twice: {parsed}")
        grid[key] = parsed
    return SweepSpec(tasks=tasks, presets=presets, seeds=seeds, set=fixed, grid=grid)


def parse_int_seed(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    return int(str(value).strip())


_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")


def _format_value(value: Any) -> str:
    return _TAG_UNSAFE.sub("_", json.dumps(value) if not isinstance(value, str) else value)


def trial_name(task: str, preset: str, seed: int, point: dict[str, Any]) -> str:
    """``<task>__<preset>__seed<seed>[__<field>=<value>,...]``."""
    name = f"{task}__{preset}__seed{seed}"
    if point:
        name += "__" + ",".join(f"{k}={_format_value(v)}" for k, v in point.items())
    return name


def expand(spec: SweepSpec, sweep_dir: Path) -> list[Trial]:
    """Every trial of the (normalized) spec with its validated TrainConfig; SweepError if any is bad."""
    trials: list[Trial] = []
    keys = list(spec.grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(spec.grid[k] for k in keys))]
    for task, preset, point, seed in itertools.product(spec.tasks, spec.presets, points, spec.seeds):
        name = trial_name(task, preset, seed, point)
        run_dir = (sweep_dir / TRIALS_DIR / name).resolve()
        try:
            cfg = preset_config(preset, **spec.set, **point, task=task, seed=seed, run_dir=str(run_dir))
            cfg.validate()
        except ConfigError as exc:
            raise SweepError(f"{exc} (trial {name})") from None
        trials.append(Trial(name=name, run_dir=run_dir, config=cfg, point=point))
    names = [t.name for t in trials]
    if len(set(names)) != len(names):
        raise SweepError("grid: two grid values give the same trial name; use distinct values")
    return trials


# --- sweep files -------------------------------------------------------------------------------
_FILE_KEYS = {f.name for f in dataclasses.fields(SweepSpec)} | {"resources"}


def load_sweep_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A YAML (.yaml, .yml) or JSON sweep file -> (spec fields, resources fields), unchecked."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SweepError(f"file: cannot read {path}: {exc}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        raise SweepError(f"file: {path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise SweepError(f"file: {path} must hold a mapping with keys {sorted(_FILE_KEYS)}")
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise SweepError(f"{sorted(unknown)[0]}: unknown sweep-file key in {path}; valid: {', '.join(sorted(_FILE_KEYS))}")
    resources = data.pop("resources", None) or {}
    if not isinstance(resources, dict):
        raise SweepError(f"resources: expected a mapping, got {resources!r}")
    return data, resources


def make_resources(values: dict[str, Any]) -> Resources:
    """Resources from a mapping (file, sweep.json or flags), each value checked; SweepError."""
    kinds = {f.name: f.type for f in dataclasses.fields(Resources)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in kinds:
            raise SweepError(f"{key}: unknown resources key; valid: {', '.join(kinds)}")
        number = None if isinstance(value, bool) else _number(value)
        if number is None or (kinds[key] == "int" and not float(number).is_integer()):
            raise SweepError(f"{key}: expected {'an integer' if kinds[key] == 'int' else 'a number'}, got {value!r}")
        out[key] = int(number) if kinds[key] == "int" else float(number)
    return Resources(**out).validate()


# --- the sweep folder --------------------------------------------------------------------------
def read_sweep_json(sweep_dir: Path) -> dict[str, Any] | None:
    path = sweep_dir / SWEEP_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return {"spec": data["spec"], "resources": data.get("resources", {})}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SweepError(f"sweep: cannot read {path}: {exc}") from None


def _json_form(spec: SweepSpec) -> dict[str, Any]:
    return json.loads(json.dumps(spec.to_dict()))


def spec_differences(old: dict[str, Any], new: SweepSpec) -> list[str]:
    """The keys in which a stored spec and ``new`` differ, as 'key: A there, B here'."""
    new_form = _json_form(new)
    out = []
    for key in new_form:
        if key in ("set", "grid"):
            a, b = old.get(key, {}), new_form[key]
            for name in sorted(set(a) | set(b)):
                if a.get(name, "(unset)") != b.get(name, "(unset)"):
                    out.append(f"{key}.{name}: {a.get(name, '(unset)')!r} there, {b.get(name, '(unset)')!r} here")
        elif old.get(key) != new_form[key]:
            out.append(f"{key}: {old.get(key)!r} there, {new_form[key]!r} here")
    return out


def check_sweep_dir(sweep_dir: Path, spec: SweepSpec) -> bool:
    """Whether ``sweep_dir`` already holds this sweep (True) or nothing yet (False).

    Raises SweepError when it holds a different sweep (naming the differences), a run
    directory, or other files.
    """
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise SweepError(f"sweep_dir: {sweep_dir} is a file, not a folder")
    if (sweep_dir / "config.json").exists():
        raise SweepError(f"sweep_dir: {sweep_dir} is a run directory (it holds config.json), not a sweep folder")
    stored = read_sweep_json(sweep_dir)
    if stored is None:
        if sweep_dir.exists() and any(sweep_dir.iterdir()):
            raise SweepError(f"sweep_dir: {sweep_dir} holds files but no {SWEEP_FILE}; pick an empty or new folder")
        return False
    diff = spec_differences(stored["spec"], spec)
    if diff:
        raise SweepError(
            f"sweep: {sweep_dir} holds another sweep ({SWEEP_FILE}); it differs in " + "; ".join(diff)
            + f". Use another folder, or continue that sweep with: qsm-sweep run --resume {sweep_dir}"
        )
    return True


def write_sweep_json(sweep_dir: Path, spec: SweepSpec, resources: Resources, trials: list[Trial]) -> Path:
    """Write (atomically) the sweep's spec, its last resources and its trial names."""
    from qsm_robot.files import atomic_write_text

    sweep_dir.mkdir(parents=True, exist_ok=True)
    data = {"version": SPEC_VERSION, "spec": _json_form(spec), "resources": resources.to_dict(),
            "trials": [t.name for t in trials]}
    path = sweep_dir / SWEEP_FILE
    atomic_write_text(path, json.dumps(data, indent=2))
    return path


def checkpoint_step(run_dir: Path) -> int:
    """The step of the run's latest checkpoint (0 when it has none)."""
    try:
        return int(json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def target_steps(trial: Trial) -> int:
    """The trial's total steps: its config.json's when it has started (a resume may extend it)."""
    try:
        return int(json.loads((trial.run_dir / "config.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return trial.config.steps


def is_finished(trial: Trial) -> bool:
    """A trial is finished when its latest checkpoint is at its total steps."""
    return (trial.run_dir / "config.json").is_file() and checkpoint_step(trial.run_dir) >= target_steps(trial)
