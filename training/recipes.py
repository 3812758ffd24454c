"""Training configuration: one dataclass, read from a YAML file, with the official recipes as presets.

    detris train --config refcoco-base            # a preset in training/recipes/
    detris train --config my.yaml --set epochs=5 --set per_device_batch_size=8

Official recipe (ARCHITECTURE.md §4.1): Adam lr 1e-4, no weight decay, MultiStepLR(gamma 0.1) stepped per epoch at
the milestones, 65 epochs (milestones 35, 55) for RefCOCO / RefCOCO+ / G-Ref umd with DETRIS-B, 50 epochs
(milestone 35) for G-Ref google, every DETRIS-L and the mixed set; total batch 32.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from configuration_detris.release import PUBLIC_TEXT_BACKBONE, VARIANT_VISION_BACKBONE

RECIPES_DIR = Path(__file__).parent / "recipes"


# torch.optim.Adam keyword arguments for each `optimizer_implementation`
OPTIMIZER_IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


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
    max_grad_norm: float = 0.0  # official: no clipping
    # Adam's implementation (same update rule): "fused" (one kernel for all tensors, CPU and CUDA), "foreach" or
    # "for-loop" (torch's CPU default, one tensor at a time). Fused is 5x faster on the demo's 208 tensors on CPU.
    optimizer_implementation: str = "fused"
    seed: int = 0

    # bookkeeping
    output_dir: str = "runs/detris"
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    log_with: str | None = "tensorboard"
    resume: bool = True  # continue from the newest valid checkpoint in output_dir

    def validate(self):
        for name in ("learning_rate", "weight_decay", "gamma", "max_grad_norm"):
            setattr(self, name, float(getattr(self, name)))
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.optimizer_implementation not in OPTIMIZER_IMPLEMENTATIONS:
            raise ValueError(
                f"optimizer_implementation must be one of {sorted(OPTIMIZER_IMPLEMENTATIONS)}, got {self.optimizer_implementation!r}"
            )
        if self.eval_sentences not in ("first", "all"):
            raise ValueError(f"eval_sentences must be 'first' or 'all', got {self.eval_sentences!r}")
        for name in ("epochs", "total_batch_size", "gradient_accumulation_steps", "eval_every_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if sorted(self.milestones) != list(self.milestones):
            raise ValueError(f"milestones must be increasing, got {self.milestones}")
        return self


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
