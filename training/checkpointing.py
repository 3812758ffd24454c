"""Training checkpoints: what is trained (adapters, head, BatchNorm statistics), optimiser, scheduler, RNG and
progress; never the frozen backbone.

A checkpoint is written into `<name>.tmp-<pid>/`, flushed, and only then renamed to `checkpoint-<step>/` with a
`COMPLETE` marker inside, so a run killed while writing leaves nothing that looks valid.
"""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"
PREFIX = "checkpoint-"


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Everything of the model except the frozen parameters: trainable weights plus every buffer that lives outside
    the frozen backbone (BatchNorm running statistics of adapters and head)."""
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in frozen}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(output_dir, step: int, model, optimizer, scheduler, progress: dict, scaler=None, rank_rng=None) -> Path:
    """Write `checkpoint-<step>` atomically (call on the main process). `rank_rng` maps rank -> rng_state()."""
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step:08d}"
    staging = output_dir / f"{final.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_file(trainable_state_dict(model), str(staging / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), staging / "scaler.pt")
    torch.save(rank_rng if rank_rng is not None else {0: rng_state()}, staging / "rng.pt")
    (staging / "progress.json").write_text(json.dumps(progress, indent=2))
    for item in staging.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())
    (staging / COMPLETE).write_text("ok\n")
    _fsync_dir(staging)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(output_dir)
    return final


def list_checkpoints(output_dir) -> list[Path]:
    """Valid checkpoints, oldest first (a folder without its COMPLETE marker, or still a .tmp, is ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.exists():
        return []
    found = [
        p for p in output_dir.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and ".tmp" not in p.name and (p / COMPLETE).exists()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir, keep: int):
    output_dir = Path(output_dir)
    for stale in output_dir.glob(f"{PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path, model, optimizer=None, scheduler=None, scaler=None) -> tuple[dict, dict]:
    """Restore a checkpoint into `model` (strictly: every trainable tensor must be there) and, when given, the
    optimiser / scheduler / scaler. Returns (progress, per-rank RNG states)."""
    path = Path(path)
    state = load_file(str(path / "trainable.safetensors"))
    expected = trainable_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.load_state_dict(state, strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    progress = json.loads((path / "progress.json").read_text())
    return progress, rng
