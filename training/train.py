"""Train DETRIS adapters and head with `accelerate`: one plain loop, from one CPU to many GPUs.

    detris train --config refcoco-base                       # one process
    accelerate launch --config_file training/accelerate_configs/multi_gpu.yaml -m training.train --config refcoco-base
    torchrun --nproc_per_node 2 -m training.train --config my.yaml   # several CPU processes (gloo)

The loop follows the official recipe (Adam, MultiStepLR per epoch, BCE, total batch 32, SyncBatchNorm on several
GPUs), evaluates every `eval_every_epochs` with the official metrics, keeps the best model by validation mIoU and
writes atomic, resumable checkpoints (adapters + head + optimiser + scheduler + RNG; never the frozen backbone).
"""

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset, Sampler

from training import checkpointing
from training.evaluation import eval_loader, evaluate_model, sentence_view
from training.recipes import OPTIMIZER_IMPLEMENTATIONS, TrainingConfig, load_training_config


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
    from modeling_detris import DetrisAdapterConfig, DetrisForReferringSegmentation, to_standalone_model

    source = Path(cfg.init_from)
    other = sorted(set(cfg.model_config) - set(TUNABLE_MODEL_SETTINGS))
    if other:
        raise ValueError(
            f"init_from={cfg.init_from!r} takes the architecture from the weights; model_config may only set "
            f"{list(TUNABLE_MODEL_SETTINGS)}, got {other}"
        )
    if (source / "config.json").is_file():
        if cfg.model_name_or_path:
            raise ValueError(
                f"init_from={cfg.init_from!r} is a whole model folder; model_name_or_path={cfg.model_name_or_path!r} "
                "is only used as the base of an adapter folder: expected one of the two"
            )
        return DetrisForReferringSegmentation.from_pretrained(str(source), **_config_kwargs(cfg))
    if not (source / "adapter_config.json").is_file():
        raise ValueError(
            f"init_from={cfg.init_from!r} is neither a DETRIS model folder (config.json) nor a PEFT adapter folder "
            "(adapter_config.json)"
        )
    from peft import PeftModel

    adapter_config = DetrisAdapterConfig.from_pretrained(str(source))
    base_path = cfg.model_name_or_path or adapter_config.base_model_name_or_path
    if not base_path:
        raise ValueError(
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


def build_processor(model):
    from processing_detris import DetrisProcessor

    return DetrisProcessor.from_model_config(model.config)


def load_datasets(cfg: TrainingConfig):
    if cfg.dataset == "refshapes":
        from training.data import RefShapesConfig, build_refshapes

        return build_refshapes(RefShapesConfig(**cfg.refshapes))
    from datasets import load_from_disk

    return load_from_disk(cfg.dataset)


class OneSentencePerObject(Dataset):
    """Object rows with one expression each, chosen as a pure function of (seed, epoch, index): the official
    random sentence per object, reproducible whatever the process count or an interruption."""

    def __init__(self, rows, seed: int):
        self.rows = rows
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = dict(self.rows[int(index)])
        sentences = row.pop("sentences")
        row.pop("sent_ids", None)
        if not sentences:
            raise ValueError(f"ref_id={row.get('ref_id')} has no expression")
        pick = torch.randint(len(sentences), (1,), generator=torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index))).item()
        row["sentence"] = sentences[pick]
        return row


class EpochShuffleSampler(Sampler):
    """A fresh permutation per epoch from (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def build_optimizer(model, cfg: TrainingConfig):
    """Adam with the official two groups: backbone adapters, then everything else trainable (the head)."""
    from modeling_detris import DenseAligner, TextAdapter

    adapter_ids = {id(p) for m in model.modules() if isinstance(m, (DenseAligner, TextAdapter)) for p in m.parameters()}
    adapters = [p for p in model.parameters() if p.requires_grad and id(p) in adapter_ids]
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids]
    groups = [g for g in ({"params": adapters}, {"params": head}) if g["params"]]
    implementation = OPTIMIZER_IMPLEMENTATIONS[cfg.optimizer_implementation]
    return torch.optim.Adam(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **implementation)


# ----- the loop -------------------------------------------------------------------------------------------------
def train(cfg: TrainingConfig, model=None, datasets=None) -> dict:
    """Run (or resume) a training; returns a summary with the history and the best validation metrics."""
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        cpu=_use_cpu_processes(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=cfg.log_with if cfg.log_with else None,
        project_dir=str(output_dir),
    )
    set_seed(cfg.seed)
    processes = accelerator.num_processes
    per_device = cfg.per_device_batch_size or max(1, cfg.total_batch_size // (processes * cfg.gradient_accumulation_steps))
    effective = per_device * processes * cfg.gradient_accumulation_steps
    accelerator.print(
        f"effective batch {effective} = {per_device} per device x {processes} process(es) x "
        f"{cfg.gradient_accumulation_steps} accumulation step(s)"
        + ("" if effective == cfg.total_batch_size else f" (config asks for {cfg.total_batch_size})")
    )

    model = model if model is not None else build_model(cfg)
    processor = build_processor(model)
    if accelerator.device.type == "cuda" and processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    datasets = datasets if datasets is not None else load_datasets(cfg)
    train_rows = OneSentencePerObject(datasets[cfg.train_split], cfg.seed)
    sampler = EpochShuffleSampler(len(train_rows), cfg.seed)
    from training.data import DetrisDataCollator

    train_loader = DataLoader(
        train_rows, batch_size=per_device, sampler=sampler, drop_last=True, num_workers=cfg.num_workers,
        collate_fn=DetrisDataCollator(processor, train=True, seed=cfg.seed),
    )
    val_loader = None
    if cfg.eval_split and cfg.eval_split in datasets:
        val_view = sentence_view(datasets[cfg.eval_split], cfg.eval_sentences, cfg.max_eval_samples)
        val_loader = eval_loader(val_view, processor, batch_size=per_device, num_workers=cfg.num_workers)

    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare_data_loader(val_loader)

    progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_miou": -1.0, "history": []}
    resume_from = checkpointing.latest_checkpoint(output_dir) if cfg.resume else None
    pending_rng = None
    if resume_from is not None:
        progress, rngs = checkpointing.load_checkpoint(
            resume_from, accelerator.unwrap_model(model), optimizer, scheduler, accelerator.scaler
        )
        pending_rng = rngs.get(accelerator.process_index, rngs[0])
        accelerator.print(f"resumed from {resume_from} (epoch {progress['epoch'] + 1}, step {progress['step_in_epoch']})")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_config.json").write_text(json.dumps(cfg.__dict__, indent=2, default=str))
    if cfg.log_with:
        accelerator.init_trackers("detris", config={k: v for k, v in cfg.__dict__.items() if isinstance(v, (int, float, str, bool))})

    steps_per_epoch = len(train_loader)
    from tqdm.auto import tqdm

    started = time.perf_counter()
    for epoch in range(progress["epoch"], cfg.epochs):
        model.train()
        train_rows.set_epoch(epoch)
        sampler.set_epoch(epoch)
        skip = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        if hasattr(loader, "set_epoch"):  # accelerate re-sets the sampler's epoch from its own counter on iter()
            loader.set_epoch(epoch)
        running = torch.zeros((), device=accelerator.device)
        counted = 0
        bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not accelerator.is_local_main_process, leave=False)
        batches = iter(loader)
        first = next(batches, None)
        if pending_rng is not None:  # starting the loader draws from the global RNG: restore it after that draw
            checkpointing.set_rng_state(pending_rng)
            pending_rng = None
        for step, batch in enumerate(itertools.chain([first] if first is not None else [], batches), start=skip):
            with accelerator.accumulate(model):
                loss = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], labels=batch["labels"]).loss
                accelerator.backward(loss)
                if cfg.max_grad_norm and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.detach()
            counted += 1
            progress.update(epoch=epoch, step_in_epoch=step + 1, global_step=progress["global_step"] + 1)
            bar.update(1)
            if (step + 1) % cfg.log_every_steps == 0 or step + 1 == steps_per_epoch:
                mean_loss = accelerator.reduce(running, reduction="mean").item() / counted  # one sync per log
                if not math.isfinite(mean_loss):
                    raise NonFiniteLossError(
                        f"loss became {mean_loss} at epoch {epoch + 1}, step {step + 1}; stopping. The last good "
                        f"checkpoint is {checkpointing.latest_checkpoint(output_dir)}"
                    )
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
                if cfg.log_with:
                    accelerator.log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0]}, step=progress["global_step"])
                running.zero_()
                counted = 0
            if cfg.checkpoint_every_steps and progress["global_step"] % cfg.checkpoint_every_steps == 0 and step + 1 < steps_per_epoch:
                _checkpoint(accelerator, cfg, model, optimizer, scheduler, progress)
        bar.close()
        scheduler.step()
        record = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - started, 1)}
        if val_loader is not None and ((epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs):
            metrics, _ = evaluate_model(accelerator.unwrap_model(model), val_loader, processor, accelerator)
            record.update({f"val/{k}": v for k, v in metrics.items()})
            if cfg.log_with:
                accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=progress["global_step"])
            if metrics["mIoU"] >= progress["best_miou"]:
                progress["best_miou"] = metrics["mIoU"]
                _save_model(accelerator, model, processor, output_dir / "best")
            accelerator.print(f"epoch {epoch + 1}: val mIoU {100 * metrics['mIoU']:.2f}  oIoU {100 * metrics['oIoU']:.2f}")
        progress["history"].append(record)
        progress.update(epoch=epoch + 1, step_in_epoch=0)
        _checkpoint(accelerator, cfg, model, optimizer, scheduler, progress)

    _save_model(accelerator, model, processor, output_dir / "final")
    if cfg.log_with:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return {"output_dir": str(output_dir), "best_miou": progress["best_miou"], "history": progress["history"],
            "num_processes": processes, "effective_batch_size": effective}


def _use_cpu_processes() -> bool:
    """Several CPU processes (torchrun without GPUs) need accelerate's `cpu=True` to form a gloo group; without it
    accelerate 1.15 silently runs every process alone."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _checkpoint(accelerator, cfg, model, optimizer, scheduler, progress):
    # Never let a diverged state replace the last good checkpoint (the loss is only read every log_every_steps).
    finite = torch.stack([torch.isfinite(p).all() for p in model.parameters() if p.requires_grad]).all()
    if not bool(accelerator.reduce(finite.float(), reduction="mean") == 1.0):
        raise NonFiniteLossError(
            f"non-finite weights at epoch {progress['epoch'] + 1}, step {progress['step_in_epoch']}; stopping. The last "
            f"good checkpoint is {checkpointing.latest_checkpoint(cfg.output_dir)}"
        )
    rng = checkpointing.rng_state()
    gathered = [None] * accelerator.num_processes
    if accelerator.num_processes > 1:
        torch.distributed.all_gather_object(gathered, rng)
    else:
        gathered = [rng]
    if accelerator.is_main_process:
        checkpointing.save_checkpoint(
            cfg.output_dir, progress["global_step"], accelerator.unwrap_model(model), optimizer, scheduler,
            progress, scaler=accelerator.scaler, rank_rng=dict(enumerate(gathered)),
        )
        checkpointing.prune_checkpoints(cfg.output_dir, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()


def _save_model(accelerator, model, processor, path):
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(path)
        processor.save_pretrained(path)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detris train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a YAML file or a preset name (see training/recipes/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    parser.add_argument("--init-from", default=None, metavar="DIR_OR_ADAPTER",
                        help="continue from converted weights: a DETRIS model folder or a PEFT adapter folder over its base")
    return parser


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    cfg = load_training_config(args.config, args.set)
    if args.init_from:
        cfg.init_from = args.init_from
    try:
        summary = train(cfg)
    except NonFiniteLossError as error:
        print(f"detris train: {error}", file=sys.stderr)
        return 3
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
