"""What both trainers build from a recipe: the model, its processor, the datasets, the optimiser and the schedule
(`training/train.py` runs them in an accelerate loop, `training/hf_trainer.py` in transformers.Trainer)."""

import json
from pathlib import Path

from training.recipes import OPTIMIZER_IMPLEMENTATIONS, TrainingConfig


class TrainingSetupError(ValueError):
    """A user mistake found before training starts (missing dataset, changed settings on resume, ...)."""


class NonFiniteLossError(RuntimeError):
    pass


# ----- model, processor, data -----------------------------------------------------------------------------------
def build_model(cfg: TrainingConfig):
    import modeling_detris  # noqa: F401  (registers the Auto classes and the PEFT method)
    from configuration_detris import DetrisConfig
    from modeling_detris import DetrisForReferringSegmentation

    if cfg.init_from:
        return load_init_model(cfg)
    if cfg.model_name_or_path:
        return DetrisForReferringSegmentation.from_pretrained(cfg.model_name_or_path, **_config_kwargs(cfg))
    if cfg.random_backbones:
        return DetrisForReferringSegmentation(DetrisConfig.from_preset(cfg.preset, **cfg.model_config))
    config = DetrisConfig.from_preset(cfg.preset, **cfg.model_config)
    return DetrisForReferringSegmentation.from_backbones(cfg.vision_backbone, cfg.text_backbone, config=config)


TUNABLE_MODEL_SETTINGS = ("adapter_scale", "decoder_dropout", "vision_adapter_attention_dropout")


def _config_kwargs(cfg):
    return {k: v for k, v in cfg.model_config.items() if k in TUNABLE_MODEL_SETTINGS}


def load_init_model(cfg: TrainingConfig):
    """The model `init_from` names, with adapters and head to train: a whole DETRIS folder (e.g. a converted official
    checkpoint), or a PEFT adapter folder (e.g. one of `detris convert --split-adapters`) loaded over its base and
    built into a standalone model (the head is the adapter's copy; the text length is the adapter's `word_len`).
    Only `adapter_scale` and the dropouts of `model_config` apply: everything else comes from the weights."""
    from modeling_detris import (
        DetrisAdapterConfig,
        DetrisForReferringSegmentation,
        adapter_base_model_path,
        to_standalone_model,
    )

    source = Path(cfg.init_from)
    other = sorted(set(cfg.model_config) - set(TUNABLE_MODEL_SETTINGS))
    if other:
        raise TrainingSetupError(
            f"init_from={cfg.init_from!r} takes the architecture from the weights; model_config may only set "
            f"{list(TUNABLE_MODEL_SETTINGS)}, got {other}"
        )
    if (source / "config.json").is_file():
        if cfg.model_name_or_path:
            raise TrainingSetupError(
                f"init_from={cfg.init_from!r} is a whole model folder; model_name_or_path={cfg.model_name_or_path!r} "
                "is only used as the base of an adapter folder: expected one of the two"
            )
        return DetrisForReferringSegmentation.from_pretrained(str(source), **_config_kwargs(cfg))
    if not (source / "adapter_config.json").is_file():
        raise TrainingSetupError(
            f"init_from={cfg.init_from!r} is neither a DETRIS model folder (config.json) nor a PEFT adapter folder "
            "(adapter_config.json)"
        )
    from peft import PeftModel

    adapter_config = DetrisAdapterConfig.from_pretrained(str(source))
    try:
        base_path = cfg.model_name_or_path or adapter_base_model_path(source)
    except OSError as error:
        raise TrainingSetupError(f"init_from: {error}; or set model_name_or_path to its DETRIS base folder") from error
    if not base_path:
        raise TrainingSetupError(
            f"the adapter folder {cfg.init_from!r} names no base model (base_model_name_or_path); set "
            "model_name_or_path to its DETRIS base folder"
        )
    for key, value in _config_kwargs(cfg).items():
        if hasattr(adapter_config, key):
            setattr(adapter_config, key, value)
    base = DetrisForReferringSegmentation.from_pretrained(base_path, **{
        k: v for k, v in _config_kwargs(cfg).items() if k == "decoder_dropout"})
    peft_model = PeftModel.from_pretrained(base, str(source), config=adapter_config)
    return to_standalone_model(peft_model)  # built from the base's config (decoder_dropout) and the adapter's


def apply_memory_format(model, cfg: TrainingConfig):
    """`model` (changed in place) with its 4-D weights channels-last when the recipe sets `channels_last`; the values
    are unchanged."""
    if cfg.channels_last:
        import torch

        model.to(memory_format=torch.channels_last)
    return model


def build_processor(model):
    from processing_detris import DetrisProcessor

    return DetrisProcessor.from_model_config(model.config)


def load_datasets(cfg: TrainingConfig):
    """The DatasetDict a recipe names, with its training split checked; a missing folder says how to build it."""
    if cfg.dataset == "refshapes":
        from training.data.refshapes import RefShapesConfig, build_refshapes

        data = build_refshapes(RefShapesConfig(**cfg.refshapes), progress=True)
    else:
        folder = Path(cfg.dataset)
        if not (folder / "dataset_dict.json").is_file():
            what = "does not exist" if not folder.exists() else "is not a dataset folder (no dataset_dict.json)"
            raise TrainingSetupError(
                f"dataset {cfg.dataset!r} {what}; expected a folder written by `detris data ...`, e.g. `detris data "
                f"refer --dataset refcoco --refer-root REFER --images-root COCO/train2014 --output {cfg.dataset}` "
                "(docs/data.md), or dataset: refshapes"
            )
        from datasets import load_from_disk

        data = load_from_disk(str(folder))
    if cfg.train_split not in data:
        raise TrainingSetupError(f"train_split {cfg.train_split!r} is not in {cfg.dataset}; it has {list(data)}")
    return data


def build_optimizer(model, cfg: TrainingConfig):
    """Adam with the official two groups: backbone adapters, then everything else trainable (the head)."""
    import torch

    from modeling_detris import DenseAligner, TextAdapter

    adapter_ids = {id(p) for m in model.modules() if isinstance(m, (DenseAligner, TextAdapter)) for p in m.parameters()}
    adapters = [p for p in model.parameters() if p.requires_grad and id(p) in adapter_ids]
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids]
    groups = [g for g in ({"params": adapters}, {"params": head}) if g["params"]]
    implementation = OPTIMIZER_IMPLEMENTATIONS[cfg.optimizer_implementation]
    return torch.optim.Adam(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **implementation)


def build_scheduler(optimizer, cfg: TrainingConfig):
    """MultiStepLR over epochs (stepped once per epoch)."""
    import torch

    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)


def apply_recipe(optimizer, scheduler, cfg: TrainingConfig):
    """After resuming with `allow_changed_settings`: the recipe's learning rate, weight decay and schedule replace the
    checkpoint's from the current epoch on."""
    from collections import Counter

    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper holds the torch scheduler
    scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    scheduler.milestones = Counter(cfg.milestones)
    scheduler.gamma = cfg.gamma
    decays = sum(scheduler.last_epoch >= m for m in cfg.milestones)
    for group in optimizer.param_groups:
        group["lr"] = cfg.learning_rate * cfg.gamma ** decays
        group["initial_lr"] = cfg.learning_rate
        group["weight_decay"] = cfg.weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def json_settings(cfg: TrainingConfig) -> dict:
    return json.loads(json.dumps(cfg.to_dict(), default=str))




class CachedBatches:
    """Collate uint8 items of a `LetterboxCache` and normalise them as the processor does (bit-identical inputs)."""

    def __init__(self, normalizer):
        self.normalizer = normalizer

    def __call__(self, items):
        from training.data.cache import LetterboxCache

        return self.normalizer(LetterboxCache.collate(items))


def training_rows(cfg: TrainingConfig, datasets, processor):
    """(training dataset with `set_epoch`, collate function), the same for both trainers: the object rows with one
    sentence each through the processor, or, with `letterbox_cache`, the uint8 cache of the same rows (same
    sentences, bit-identical tensors, no image decoding at train time)."""
    rows = datasets[cfg.train_split]
    if not cfg.letterbox_cache:
        from training.data.collate import DetrisDataCollator
        from training.data.sentences import OneSentencePerObject

        return OneSentencePerObject(rows, cfg.seed), DetrisDataCollator(processor, train=True)
    from training.data.cache import DeviceNormalizer, LetterboxCache

    folder = Path(cfg.letterbox_cache)
    if not (folder / "meta.json").is_file():
        raise TrainingSetupError(f"letterbox_cache {cfg.letterbox_cache!r} is not a cache folder (no meta.json); "
                                 f"expected the output of `detris data cache --split {cfg.train_split} --processor ...`")
    cache = LetterboxCache(str(folder), train=True, seed=cfg.seed)
    size = processor.image_processor.size
    size = size if isinstance(size, int) else (size.get("height") if isinstance(size, dict) else size.height)
    if len(cache) != len(rows) or cache.size != size or cache.input_ids is None:
        raise TrainingSetupError(
            f"letterbox_cache {cfg.letterbox_cache!r} holds {len(cache)} rows at {cache.size} px"
            f"{'' if cache.input_ids is not None else ' without token ids'}; expected the {len(rows)} rows of split "
            f"{cfg.train_split!r} at the model's {size} px, built with --processor")
    return cache, CachedBatches(DeviceNormalizer.from_processor(processor, size))
