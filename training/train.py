"""Train DETRIS adapters and head with `accelerate`: one plain loop, from one CPU to many GPUs.

    detris train --config refcoco-base                       # one process
    detris train --config refcoco-base --trainer hf          # the same recipe with transformers.Trainer
    accelerate launch --config_file training/accelerate_configs/multi_gpu.yaml -m training.train --config refcoco-base
    torchrun --nproc_per_node 2 -m training.train --config my.yaml   # several CPU processes (gloo)

The loop follows the official recipe (Adam, MultiStepLR per epoch, BCE, total batch 32, SyncBatchNorm on several
GPUs), evaluates every `eval_every_epochs` with the official metrics, keeps the best model by validation mIoU and
writes atomic, resumable checkpoints with `Accelerator.save_state` (adapters + head + optimiser + scheduler + RNG;
never the frozen backbone; see training/checkpointing.py).
"""

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

from training.parts import (  # noqa: F401  (build_model etc. are also this module's public names)
    NonFiniteLossError,
    TrainingSetupError,
    apply_memory_format,
    apply_recipe,
    build_model,
    build_optimizer,
    build_processor,
    build_scheduler,
    json_settings,
    load_datasets,
    training_rows,
)
from training.recipes import TrainingConfig, batch_plan, changed_settings, load_training_config, uses_sync_batchnorm


# ----- the loop -------------------------------------------------------------------------------------------------
def train(cfg: TrainingConfig, model=None, datasets=None) -> dict:
    """Run (or resume) a training; returns a summary with the history and the best validation metrics."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    from training.folders import FolderInUseError, OutputLock

    datasets = datasets if datasets is not None else load_datasets(cfg)
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        cpu=_use_cpu_processes(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,  # MultiStepLR steps once per epoch, on every process alike
        log_with=cfg.log_with if cfg.log_with else None,
        project_dir=str(output_dir),
    )
    lock, refusal = OutputLock(output_dir), [None]
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except FolderInUseError as error:
            refusal = [str(error)]
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise FolderInUseError(refusal[0])
    try:
        return _train(accelerator, cfg, model, datasets)
    finally:
        lock.release()


def _train(accelerator, cfg, model, datasets) -> dict:
    import torch
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from training import checkpointing
    from training.data.sentences import EpochShuffleSampler
    from training.evaluation import eval_loader, evaluate_model, sentence_view

    output_dir = Path(cfg.output_dir)
    set_seed(cfg.seed)
    processes = accelerator.num_processes
    per_device, effective = batch_plan(cfg, processes)
    accelerator.print(
        f"effective batch {effective} = {per_device} per device x {processes} process(es) x "
        f"{cfg.gradient_accumulation_steps} accumulation step(s)"
        + ("" if effective == cfg.total_batch_size else f" (config asks for {cfg.total_batch_size})")
    )

    model = apply_memory_format(model if model is not None else build_model(cfg), cfg)
    processor = build_processor(model)
    if uses_sync_batchnorm(accelerator.device.type, processes):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_rows, collate = training_rows(cfg, datasets, processor)
    sampler = EpochShuffleSampler(len(train_rows), cfg.seed)
    train_loader = DataLoader(
        train_rows, batch_size=per_device, sampler=sampler, drop_last=True, num_workers=cfg.num_workers,
        collate_fn=collate,
    )
    val_loader = None
    if cfg.eval_split and cfg.eval_split in datasets:
        val_view = sentence_view(datasets[cfg.eval_split], cfg.eval_sentences, cfg.max_eval_samples)
        val_loader = eval_loader(val_view, processor, batch_size=per_device, num_workers=cfg.num_workers)

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if val_loader is not None:
        val_loader = accelerator.prepare_data_loader(val_loader)
    checkpointing.keep_only_trainable(accelerator)
    unwrapped = accelerator.unwrap_model(model)
    settings = json_settings(cfg)

    progress, skip, pending_rng = {"epoch": 0, "step_in_epoch": 0, "samples_in_epoch": 0, "global_step": 0,
                                   "best_miou": -1.0, "history": [], "settings_changes": []}, 0, None
    if cfg.resume:
        resumed = _resume(accelerator, cfg, unwrapped, optimizer, scheduler, settings, per_device)
        if resumed is not None:
            progress, skip = resumed
            pending_rng = checkpointing.rng_state()  # as restored by load_state
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_config.json").write_text(json.dumps(settings, indent=2))
    if cfg.log_with:
        accelerator.init_trackers("detris", config={k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))})

    steps_per_epoch = len(train_loader)
    started = time.perf_counter()
    resume_epoch = progress["epoch"]
    for epoch in range(resume_epoch, cfg.epochs):
        model.train()
        train_rows.set_epoch(epoch)
        sampler.set_epoch(epoch)
        first_step = skip if epoch == resume_epoch else 0
        loader = accelerator.skip_first_batches(train_loader, first_step) if first_step else train_loader
        if hasattr(loader, "set_epoch"):  # accelerate re-sets the sampler's epoch from its own counter on iter()
            loader.set_epoch(epoch)
        running = torch.zeros((), device=accelerator.device)
        counted = 0
        bar = tqdm(total=steps_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not accelerator.is_local_main_process, leave=False)
        batches = iter(loader)
        first = next(batches, None)
        if pending_rng is not None:  # starting the loader draws from the global RNG: restore it after that draw
            checkpointing.set_rng_state(pending_rng)
            pending_rng = None
        for step, batch in enumerate(itertools.chain([first] if first is not None else [], batches), start=first_step):
            with accelerator.accumulate(model):
                loss = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], labels=batch["labels"]).loss
                accelerator.backward(loss)
                if cfg.max_grad_norm > 0 and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.detach()
            counted += 1
            progress.update(epoch=epoch, step_in_epoch=step + 1, samples_in_epoch=(step + 1) * per_device * processes,
                            global_step=progress["global_step"] + 1)
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
                _checkpoint(accelerator, cfg, model, progress, settings)
        bar.close()
        scheduler.step()
        record = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - started, 1)}
        if val_loader is not None and ((epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs):
            metrics, _ = evaluate_model(unwrapped, val_loader, processor, accelerator)
            record.update({f"val/{k}": v for k, v in metrics.items()})
            if cfg.log_with:
                accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=progress["global_step"])
            if metrics["mIoU"] >= progress["best_miou"]:
                progress["best_miou"] = metrics["mIoU"]
                _save_model(accelerator, model, processor, output_dir / "best")
            # fractions, as in the JSON summary and the logs (docs/training.md)
            accelerator.print(f"epoch {epoch + 1}: val mIoU {metrics['mIoU']:.4f}  oIoU {metrics['oIoU']:.4f}")
        progress["history"].append(record)
        progress.update(epoch=epoch + 1, step_in_epoch=0, samples_in_epoch=0)
        _checkpoint(accelerator, cfg, model, progress, settings)

    _save_model(accelerator, model, processor, output_dir / "final")
    accelerator.wait_for_everyone()
    if cfg.log_with:
        accelerator.end_training()  # destroys the process group: nothing collective may follow
    return {"output_dir": str(output_dir), "best_miou": progress["best_miou"], "history": progress["history"],
            "num_processes": processes, "effective_batch_size": effective}


def _resume(accelerator, cfg, model, optimizer, scheduler, settings, per_device):
    """Load the newest usable checkpoint of `cfg.output_dir` (None when there is none): (progress, batches of this run
    to skip in the resumed epoch). Changed settings are refused unless allowed, then applied and recorded."""
    from training import checkpointing

    processes = accelerator.num_processes
    expected = set(checkpointing.trainable_state_dict(model))
    path, progress = checkpointing.newest_usable_checkpoint(cfg.output_dir, expected, processes, log=accelerator.print)
    if path is None:
        return None
    saved = json.loads((path / checkpointing.SETTINGS).read_text())
    changed = changed_settings(saved, settings)
    if changed and not cfg.allow_changed_settings:
        raise TrainingSetupError(
            f"{path} was written with other settings: {changed} differ "
            f"({', '.join(f'{k}: {saved.get(k)!r} -> {settings.get(k)!r}' for k in changed[:6])}); expected the same "
            "recipe to resume. Set allow_changed_settings=true (--allow-changed-settings) to continue with the new "
            "values, or use another output_dir"
        )
    batch_samples = per_device * processes
    if progress["samples_in_epoch"] % batch_samples:
        raise TrainingSetupError(
            f"{path} stopped after {progress['samples_in_epoch']} samples of epoch {progress['epoch'] + 1}, not a "
            f"multiple of this run's {batch_samples} samples per step ({per_device} per device x {processes} "
            "process(es)); expected a batch size that divides it"
        )
    checkpointing.load_checkpoint(accelerator, path, model)
    skip = progress["samples_in_epoch"] // batch_samples
    progress["step_in_epoch"] = skip
    if changed:
        apply_recipe(optimizer, scheduler, cfg)
        progress["settings_changes"].append(
            {"global_step": progress["global_step"], "changed": {k: [saved.get(k), settings.get(k)] for k in changed}})
        accelerator.print(f"resuming with changed settings {changed} (allow_changed_settings)")
    accelerator.print(f"resumed from {path} (epoch {progress['epoch'] + 1}, step {skip})")
    return progress, skip


def _use_cpu_processes() -> bool:
    """Several CPU processes (torchrun without GPUs) need accelerate's `cpu=True` to form a gloo group; without it
    accelerate 1.15 silently runs every process alone."""
    import torch

    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _checkpoint(accelerator, cfg, model, progress, settings):
    import torch

    from training import checkpointing

    # Never let a diverged state replace the last good checkpoint (the loss is only read every log_every_steps).
    finite = torch.stack([torch.isfinite(p).all() for p in model.parameters() if p.requires_grad]).all()
    if not bool(accelerator.reduce(finite.float(), reduction="mean") == 1.0):
        raise NonFiniteLossError(
            f"non-finite weights at epoch {progress['epoch'] + 1}, step {progress['step_in_epoch']}; stopping. The last "
            f"good checkpoint is {checkpointing.latest_checkpoint(cfg.output_dir)}"
        )
    checkpointing.save_checkpoint(accelerator, cfg.output_dir, progress["global_step"], progress, settings)
    if accelerator.is_main_process:
        checkpointing.prune_checkpoints(cfg.output_dir, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()


def _save_model(accelerator, model, processor, path):
    """`save_pretrained` of the model and the processor into `path`, written whole or not at all."""
    from configuration_detris.folders import atomic_folder

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_folder(path, overwrite=True) as staging:
            accelerator.unwrap_model(model).save_pretrained(staging)
            processor.save_pretrained(staging)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detris train", description="Train DETRIS adapters and head from a recipe (a YAML file or a preset).",
        epilog="Runs resume from the newest valid checkpoint in output_dir. docs/training.md lists every setting.")
    parser.add_argument("--config", required=True, help="a YAML file or a preset name (see training/recipes/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting (repeatable), e.g. --set epochs=5 --set model_config.word_len=22")
    parser.add_argument("--init-from", default=None, metavar="DIR_OR_ADAPTER",
                        help="continue from converted weights: a DETRIS model folder or a PEFT adapter folder over its base")
    parser.add_argument("--trainer", choices=("accelerate", "hf"), default=None,
                        help="the plain accelerate loop (default) or transformers.Trainer (training/hf_trainer.py)")
    parser.add_argument("--allow-changed-settings", action="store_true",
                        help="resume even though settings differ from the checkpoint's (the new values apply)")
    return parser


def main(argv=None) -> int:
    from training.folders import FolderInUseError

    args = build_arg_parser().parse_args(argv)
    try:
        cfg = load_training_config(args.config, args.set)
        if args.init_from:
            cfg.init_from = args.init_from
        if args.trainer:
            cfg.trainer = args.trainer
        if args.allow_changed_settings:
            cfg.allow_changed_settings = True
    except ValueError as error:  # the recipe itself: unknown key, bad value, missing file
        print(f"detris train: {error}", file=sys.stderr)
        return 2
    try:
        if cfg.trainer == "hf":
            from training.hf_trainer import train_with_trainer

            summary = train_with_trainer(cfg)
        else:
            summary = train(cfg)
    except NonFiniteLossError as error:
        print(f"detris train: {error}", file=sys.stderr)
        return 3
    except (TrainingSetupError, FolderInUseError) as error:
        print(f"detris train: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
