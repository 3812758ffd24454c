"""Training checkpoints on accelerate's `save_state` / `load_state`, kept safe and whole.

A checkpoint `checkpoint-<step>/` holds what `Accelerator.save_state` writes (`model.safetensors` with only what is
trained: adapters, head and their BatchNorm statistics, never the frozen backbone; `optimizer.bin`,
`scheduler.bin`, `random_states_<rank>.pkl`, `scaler.pt` under fp16) plus our own `progress.json` and
`training_config.json`, and a `COMPLETE` marker. It is written into a staging folder (`.checkpoint-<step>.partial`)
and renamed when every process has written its part, so an interrupted checkpoint never looks valid.

Nothing a resume reads can run code: before `load_state` every file is opened the way accelerate will open it
(`safetensors`, or `torch.load(weights_only=True)` with accelerate's list of safe numpy globals), and a folder with any
other file (for example the `custom_checkpoint_*.pkl` that accelerate would unpickle with `weights_only=False`) is
refused. A newest checkpoint that fails these checks is reported by file and the previous good one is used.
"""

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

COMPLETE = "COMPLETE"
PREFIX = "checkpoint-"
PROGRESS = "progress.json"
SETTINGS = "training_config.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
# the files accelerate's save_state writes for one model, optimizer and scheduler (no registered custom objects)
_ALLOWED = re.compile(r"^(model\.safetensors|optimizer\.bin|scheduler\.bin|scaler\.pt|random_states_\d+\.pkl|"
                      rf"{PROGRESS}|{SETTINGS}|{COMPLETE})$")


class CorruptCheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from; the message names the file."""


def frozen_parameter_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if not param.requires_grad}


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Everything of the model's state except the frozen parameters (trainable weights and every buffer outside the
    frozen backbones, e.g. BatchNorm running statistics of adapters and head)."""
    frozen = frozen_parameter_names(model)
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def keep_only_trainable(accelerator):
    """Register a `save_state` hook so accelerate writes only the trainable state, under the unwrapped model's names
    (the same keys whatever the number of processes)."""

    def hook(models, weights, output_dir):
        for index, model in enumerate(models[: len(weights)]):
            state = trainable_state_dict(accelerator.unwrap_model(model))
            weights[index] = {k: v.detach().cpu().contiguous() for k, v in state.items()}

    return accelerator.register_save_state_pre_hook(hook)


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


def checkpoint_path(output_dir, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step:08d}"


def save_checkpoint(accelerator, output_dir, step: int, progress: dict, settings: dict) -> Path:
    """Write `checkpoint-<step>` with `accelerator.save_state` (call on every process): the main process owns the
    staging folder (`configuration_detris.folders.atomic_folder`, shared by name), every process writes its part into
    it, and it is renamed once all are done."""
    import contextlib

    from configuration_detris.folders import atomic_folder, staging_path

    final = checkpoint_path(output_dir, step)
    main = accelerator.is_main_process
    writing = atomic_folder(final, overwrite=True, shared=True) if main else contextlib.nullcontext(staging_path(final))
    with writing as staging:
        accelerator.wait_for_everyone()  # the staging folder exists
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()  # every process wrote its files
        if main:
            (staging / PROGRESS).write_text(json.dumps(progress, indent=2))
            (staging / SETTINGS).write_text(json.dumps(settings, indent=2, default=str))
            (staging / COMPLETE).write_text("ok\n")
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first (staging folders and folders without the COMPLETE marker are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir, keep: int):
    """Keep the newest `keep` checkpoints; remove staging folders a killed run left (call under the run's lock)."""
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in Path(output_dir).glob(f".{PREFIX}*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def _safe_load(path: Path):
    from accelerate.utils import load

    return load(path, map_location="cpu", weights_only=True)


def verify_checkpoint(path, expected_keys: set[str], num_processes: int) -> dict:
    """Open every file of a checkpoint without running code; returns its progress. Raises CorruptCheckpointError
    naming the bad file."""
    from safetensors import safe_open

    path = Path(path)
    extra = sorted(p.name for p in path.iterdir() if not _ALLOWED.match(p.name))
    if extra:
        raise CorruptCheckpointError(f"{path} holds unexpected file(s) {extra}; expected only what a detris training "
                                     "checkpoint writes (nothing else is loaded, and nothing is unpickled)")
    current = path / "model.safetensors"
    try:
        with safe_open(str(current), framework="pt") as handle:
            keys = set(handle.keys())
            for key in keys:
                handle.get_tensor(key)
        optional = ("scaler.pt",) + tuple(f"random_states_{r}.pkl" for r in range(num_processes))
        for name in ("optimizer.bin", "scheduler.bin") + optional:
            current = path / name
            if name in optional and not current.exists():
                continue  # no fp16 scaler; or a run on more processes than the checkpoint's (their RNG is not restored)
            _safe_load(current)
        current = path / PROGRESS
        progress = json.loads(current.read_text())
    except Exception as error:  # any unreadable file makes the checkpoint unusable
        raise CorruptCheckpointError(f"{current}: cannot be read ({type(error).__name__}: {error})") from error
    missing, unexpected = sorted(expected_keys - keys), sorted(keys - expected_keys)
    if missing or unexpected:
        raise CorruptCheckpointError(
            f"{current.parent / 'model.safetensors'} does not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return progress


def newest_usable_checkpoint(output_dir, expected_keys: set[str], num_processes: int, log=print):
    """(path, progress) of the newest checkpoint that passes `verify_checkpoint`, trying older ones after a bad
    one (each refusal is logged with its reason); (None, None) when there is none."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            return path, verify_checkpoint(path, expected_keys, num_processes)
        except CorruptCheckpointError as error:
            log(f"skipping checkpoint {path.name}: {error}")
    return None, None


def load_checkpoint(accelerator, path, model):
    """`accelerator.load_state` of a verified checkpoint (optimizer, scheduler, scaler, RNG), then its weights into
    the unwrapped `model`, every trainable tensor required (accelerate's own model load is not strict, as the frozen
    backbone is not in the file, and may see wrapped names)."""
    from safetensors.torch import load_file

    accelerator.load_state(str(path), strict=False)
    state = load_file(str(Path(path) / "model.safetensors"))
    model.load_state_dict(state, strict=False)
