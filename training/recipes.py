"""Training configuration: one dataclass, read from a YAML file, with the official recipes as presets.

    detris train --config refcoco-base            # a preset in training/recipes/
    detris train --config my.yaml --set epochs=5 --set per_device_batch_size=8

The dataclass is filled from YAML plus `--set key=value` overrides (values parsed as YAML, nested keys with dots), not
with transformers' `HfArgumentParser`: two settings are nested dicts (`model_config`, `refshapes`) that it cannot
parse from a command line, and importing it (~0.8 s, all of transformers) would make `detris train --help` slow.
Every value is checked by `TrainingConfig.validate`.

Official recipe (docs/training.md): Adam lr 1e-4, no weight decay, MultiStepLR(gamma 0.1) stepped per epoch at
the milestones, 65 epochs (milestones 35, 55) for RefCOCO / RefCOCO+ / G-Ref umd with DETRIS-B, 50 epochs
(milestone 35) for G-Ref google, every DETRIS-L and the mixed set; total batch 32.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from configuration_detris.release import PUBLIC_TEXT_BACKBONE, VARIANT_VISION_BACKBONE

RECIPES_DIR = Path(__file__).parent / "recipes"


# torch.optim.Adam keyword arguments for each `optimizer_implementation`
OPTIMIZER_IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
TRAINERS = ("accelerate", "hf")
# settings that do not change what is computed: a resume may change them freely
RUN_SETTINGS = ("output_dir", "resume", "allow_changed_settings", "log_with", "log_every_steps", "num_workers",
                "keep_checkpoints", "checkpoint_every_steps", "eval_every_epochs", "max_eval_samples")


def changed_settings(saved: dict, current: dict) -> list[str]:
    """The settings (outside RUN_SETTINGS) whose values differ between a checkpoint's record and this run."""
    keys = (set(saved) | set(current)) - set(RUN_SETTINGS)
    return sorted(k for k in keys if saved.get(k) != current.get(k))


@dataclass
class TrainingConfig:
    # model: a saved DETRIS to fine-tune, else pretrained backbones + a preset, else (demo) random backbones
    model_name_or_path: str | None = None
    # continue from converted weights: a whole DETRIS folder, or a PEFT adapter folder over its base (the base named
    # by the adapter's base_model_name_or_path, or by model_name_or_path when given); see docs/release.md
    init_from: str | None = None
    preset: str = "base"
    vision_backbone: str = VARIANT_VISION_BACKBONE["base"]
    text_backbone: str = PUBLIC_TEXT_BACKBONE
    random_backbones: bool = False
    model_config: dict = field(default_factory=dict)  # DetrisConfig overrides (word_len, input_size, ...)

    # data: "refshapes", or a folder written by `detris data ...` (a DatasetDict saved with save_to_disk)
    dataset: str = "refshapes"
    refshapes: dict = field(default_factory=dict)  # RefShapesConfig fields when dataset == "refshapes"
    train_split: str = "train"
    eval_split: str = "val"
    eval_sentences: str = "first"  # official validation: first sentence of each object; "all" = official test
    max_eval_samples: int | None = None
    num_workers: int = 0
    # a folder of `detris data cache` for train_split: uint8 letterboxed images, masks and token ids read instead of
    # decoding images at every step (same tensors, bit for bit)
    letterbox_cache: str | None = None

    # optimisation
    epochs: int = 65
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    milestones: list = field(default_factory=lambda: [35, 55])
    gamma: float = 0.1
    total_batch_size: int = 32
    per_device_batch_size: int | None = None  # default: total / (processes x accumulation)
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    max_grad_norm: float = 0.0  # clip the gradient norm to this value; 0 = off (official: no clipping)
    # Adam's implementation (same update rule): "fused" (one kernel for all tensors, CPU and CUDA), "foreach" or
    # "for-loop" (torch's CPU default, one tensor at a time). Fused is 5x faster on the demo's 208 tensors on CPU.
    optimizer_implementation: str = "fused"
    # the model's 4-D weights (convolutions) stored channels-last (NHWC): oneDNN's CPU convolutions then skip a
    # layout reorder per call and run their backward faster (the demo's steps ~10 % faster on x86, same weights bit
    # for bit after training); off by default
    channels_last: bool = False
    seed: int = 0

    # bookkeeping
    output_dir: str = "runs/detris"
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    log_with: str | None = "tensorboard"
    resume: bool = True  # continue from the newest valid checkpoint in output_dir
    # resuming with settings that differ from the checkpoint's is refused unless this is true (then the new values
    # apply from the resumed step on, and the checkpoint records them)
    allow_changed_settings: bool = False
    # "accelerate": the plain loop (training/train.py); "hf": transformers.Trainer (training/hf_trainer.py)
    trainer: str = "accelerate"

    def validate(self):
        for name in ("learning_rate", "weight_decay", "gamma", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("epochs", "total_batch_size", "gradient_accumulation_steps", "eval_every_epochs",
                     "checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "num_workers", "seed",
                     "per_device_batch_size", "max_eval_samples"):
            value = getattr(self, name)
            if value is None and name in ("per_device_batch_size", "max_eval_samples"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            minimum = 0 if name in ("checkpoint_every_steps", "num_workers", "seed") else 1
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        for name in ("random_backbones", "resume", "allow_changed_settings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1] (the factor of each learning-rate decay), got {self.gamma}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be > 0, or 0 for no clipping, got {self.max_grad_norm}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.optimizer_implementation not in OPTIMIZER_IMPLEMENTATIONS:
            raise ValueError(
                f"optimizer_implementation must be one of {sorted(OPTIMIZER_IMPLEMENTATIONS)}, got {self.optimizer_implementation!r}"
            )
        if self.eval_sentences not in ("first", "all"):
            raise ValueError(f"eval_sentences must be 'first' or 'all', got {self.eval_sentences!r}")
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {list(TRAINERS)}, got {self.trainer!r}")
        if not isinstance(self.milestones, list) or not all(
                isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in self.milestones):
            raise ValueError(f"milestones must be a list of epochs >= 1, got {self.milestones!r}")
        if sorted(set(self.milestones)) != list(self.milestones):
            raise ValueError(f"milestones must be strictly increasing, got {self.milestones}")
        for name in ("model_config", "refshapes"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a mapping, got {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)



def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _parse_value(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_training_config(path_or_preset: str | None = None, overrides: list[str] | dict | None = None) -> TrainingConfig:
    """A `TrainingConfig` from a YAML file or a preset name in training/recipes/, with `key=value` overrides
    (values parsed as YAML, e.g. `milestones=[2,4]`; nested keys with dots, e.g. `model_config.word_len=22`)."""
    values = {}
    if path_or_preset:
        path = Path(path_or_preset)
        if not path.exists():
            path = RECIPES_DIR / f"{path_or_preset}.yaml"
        if not path.exists():
            raise ValueError(f"no training config {path_or_preset!r}: not a file, and not a preset of {available_recipes()}")
        values = yaml.safe_load(path.read_text()) or {}
    if isinstance(overrides, dict):
        overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in overrides.items()]
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        target = values
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = _parse_value(text)
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
    return TrainingConfig(**values).validate()


def batch_plan(cfg: TrainingConfig, processes: int) -> tuple[int, int]:
    """(per-device batch, effective batch) of a recipe on `processes` processes: the total batch is divided over the
    processes and the accumulation steps (both trainers use this)."""
    per_device = cfg.per_device_batch_size or max(1, cfg.total_batch_size // (processes * cfg.gradient_accumulation_steps))
    return per_device, per_device * processes * cfg.gradient_accumulation_steps


def uses_sync_batchnorm(device_type: str, processes: int) -> bool:
    """BatchNorm statistics are synchronised across processes on several GPUs (the official recipe), never on CPU."""
    return device_type == "cuda" and processes > 1
