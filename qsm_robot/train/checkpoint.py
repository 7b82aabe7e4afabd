"""Checkpoints: safetensors weights plus JSON metadata, written atomically.

A run directory's ``checkpoints/`` holds one folder per checkpoint and ``latest.json``:

    checkpoints/
      latest.json                 {"checkpoint": "step_000050000", "step": 50000}
      step_000050000/
        policy.safetensors        denoiser weights          } the policy part: enough for
        policy.json               PolicySpec + PolicyIO     } export (qsm_robot.qsm.policy)
        train_state.safetensors   critics, targets, optimiser moments, replay, RNG tensors
        train_state.json          counters, RNG and env states, optimiser hyperparameters

A checkpoint folder is written under a temporary name, flushed to disk, then renamed; only
after that is ``latest.json`` replaced (write to a temporary file, then ``os.replace``). A kill at
any moment leaves ``latest.json`` naming a complete checkpoint, or, before the first checkpoint
is complete, no ``latest.json`` at all (:func:`has_checkpoint` is then False). Temporaries a
killed writer left behind (``.tmp-step_*`` folders, ``.latest.json.tmp-*`` files) are never read
as checkpoints; :func:`remove_temporaries` deletes them when a run is resumed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from safetensors.torch import load_file, save_file

from qsm_robot.checkpoint_layout import STATE_PREFIX, TRAIN_STATE_META, TRAIN_STATE_TENSORS
from qsm_robot.files import atomic_write_text
from qsm_robot.files import remove_temporaries as remove_temporary_files
from qsm_robot.qsm.policy import CheckpointError, PolicySpec, resolve_checkpoint, save_policy_files

TRAIN_STATE_VERSION = 1


def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of a nested dict/list into ``tensors`` (by path); return the JSON rest."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    return obj


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state` (dict keys keep their types: ints stay ints)."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def _fsync_tree(path: Path) -> None:
    for p in [*path.iterdir(), path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    spec: PolicySpec,
    denoiser: torch.nn.Module,
    train_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest.json`` at it, prune old ones."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:09d}"
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_policy_files(tmp, spec, denoiser)
    tensors: dict[str, torch.Tensor] = {}
    meta = flatten_state(train_state, STATE_PREFIX, tensors)
    save_file(tensors, str(tmp / TRAIN_STATE_TENSORS))
    (tmp / TRAIN_STATE_META).write_text(json.dumps({"version": TRAIN_STATE_VERSION, "state": meta}))
    _fsync_tree(tmp)
    if final.exists():  # a leftover that latest.json never named (a kill before its update)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_tree(ckpt_root)
    atomic_write_text(ckpt_root / "latest.json", json.dumps({"checkpoint": name, "step": step}))
    old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether the run directory ``run_dir`` has a latest checkpoint (its ``checkpoints/latest.json``)."""
    return (Path(run_dir) / "checkpoints" / "latest.json").is_file()


def remove_temporaries(ckpt_root: Path) -> list[Path]:
    """Delete the partial writes that killed processes left in ``ckpt_root``; return what went.

    Only call it when no other process writes checkpoints into ``ckpt_root`` (e.g. on resume).
    """
    if not ckpt_root.is_dir():
        return []
    folders = sorted(p for p in ckpt_root.glob(".tmp-step_*") if p.is_dir())
    for p in folders:
        shutil.rmtree(p, ignore_errors=True)
    return folders + remove_temporary_files(ckpt_root)


def load_train_state(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder of a run or checkpoint path, and its training state (CPU tensors)."""
    ckpt = resolve_checkpoint(path)
    try:
        meta = json.loads((ckpt / TRAIN_STATE_META).read_text())
        tensors = load_file(str(ckpt / TRAIN_STATE_TENSORS), device="cpu")
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read the training state in {ckpt}: {exc}") from exc
    if meta.get("version") != TRAIN_STATE_VERSION:
        raise CheckpointError(
            f"{ckpt}: training-state version {meta.get('version')} is not supported "
            f"(this qsm-robot reads version {TRAIN_STATE_VERSION})"
        )
    return ckpt, unflatten_state(meta["state"], tensors)
