"""Train DETRIS with `transformers.Trainer`: the same model, data, recipe and outputs as `training.train`.

    detris train --config refcoco-base --trainer hf

`trainer_arguments` turns the recipe into `TrainingArguments` with the same effective batch as the accelerate loop
(the total batch divided over processes and accumulation steps, `training.recipes.batch_plan`), the same logging
(`log_with`, `log_every_steps`) and SyncBatchNorm rule. The run resumes from the newest checkpoint in `output_dir`
(Trainer's own loading, `weights_only=True`), checkpoints and `final/` hold the processor files, and `final/` is
written atomically. `DetrisTrainer` sets the official optimiser (Adam, two groups, no weight decay) and the per-epoch MultiStep decay,
and evaluates with the official protocol: logits are post-processed batch by batch and only per-sample
intersection / union counts are kept, never the full-resolution logits.
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from training.evaluation import eval_loader, evaluate_model, sentence_view
from training.parts import (
    TrainingSetupError,
    apply_memory_format,
    build_model,
    build_optimizer,
    build_processor,
    json_settings,
    load_datasets,
    training_rows,
)
from training.recipes import TrainingConfig, batch_plan, changed_settings, uses_sync_batchnorm


class _EpochSetter(TrainerCallback):
    """Gives the training rows the current epoch, so each epoch draws its own (reproducible) expressions."""

    def __init__(self, rows):
        self.rows = rows

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.rows.set_epoch(int(state.epoch or 0))


class DetrisTrainer(Trainer):
    def __init__(self, *args, recipe: TrainingConfig, processor, eval_view=None, **kwargs):
        self.recipe = recipe
        self.processor = processor
        self.eval_view = eval_view
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = build_optimizer(model if model is not None else self.model, self.recipe)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = optimizer or self.optimizer
            epochs = max(1, int(round(self.args.num_train_epochs)))
            steps_per_epoch = max(1, num_training_steps // epochs)
            milestones, gamma = list(self.recipe.milestones), self.recipe.gamma

            def factor(step: int) -> float:
                epoch = step // steps_per_epoch
                return gamma ** sum(epoch >= m for m in milestones)

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return self.lr_scheduler

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        view = self.eval_view if eval_dataset is None else sentence_view(eval_dataset, self.recipe.eval_sentences)
        loader = self.accelerator.prepare_data_loader(
            eval_loader(view, self.processor, self.args.per_device_eval_batch_size, self.args.dataloader_num_workers)
        )
        metrics, _ = evaluate_model(self.accelerator.unwrap_model(self.model), loader, self.processor, self.accelerator)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def build_trainer(recipe: TrainingConfig, args: TrainingArguments, model=None, datasets=None) -> DetrisTrainer:
    datasets = datasets if datasets is not None else load_datasets(recipe)
    model = apply_memory_format(model if model is not None else build_model(recipe), recipe)
    if uses_sync_batchnorm("cuda" if torch.cuda.is_available() else "cpu", args.world_size):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    processor = build_processor(model)
    rows, collate = training_rows(recipe, datasets, processor)
    eval_view = None
    if recipe.eval_split and recipe.eval_split in datasets:
        eval_view = sentence_view(datasets[recipe.eval_split], recipe.eval_sentences, recipe.max_eval_samples)
    return DetrisTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        eval_dataset=eval_view,
        data_collator=collate,
        processing_class=processor,  # saved beside every checkpoint and the final model
        callbacks=[_EpochSetter(rows)],
        recipe=recipe,
        processor=processor,
        eval_view=eval_view,
    )


def trainer_arguments(recipe: TrainingConfig, **overrides) -> TrainingArguments:
    """TrainingArguments that follow the recipe (epochs, batch per device from `batch_plan`, precision, clipping,
    logging, seed); `overrides` win."""
    per_device, _ = batch_plan(recipe, int(os.environ.get("WORLD_SIZE", "1")))
    settings = dict(
        output_dir=recipe.output_dir,
        num_train_epochs=recipe.epochs,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        bf16=recipe.mixed_precision == "bf16",
        fp16=recipe.mixed_precision == "fp16",
        seed=recipe.seed,
        remove_unused_columns=False,
        dataloader_drop_last=True,
        dataloader_num_workers=recipe.num_workers,
        eval_strategy="epoch" if recipe.eval_split else "no",
        save_strategy="epoch",
        save_total_limit=recipe.keep_checkpoints,
        metric_for_best_model="eval_mIoU",
        greater_is_better=True,
        logging_steps=recipe.log_every_steps,
        report_to=[recipe.log_with] if recipe.log_with else "none",
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def train_with_trainer(recipe: TrainingConfig, datasets=None, **argument_overrides) -> dict:
    """`detris train --trainer hf`: train (resuming from the newest checkpoint in output_dir when `resume`), save
    `final/` (model + processor) atomically; returns the same summary as `training.train.train`."""
    from transformers.trainer_utils import get_last_checkpoint

    from configuration_detris.folders import atomic_folder
    from training.folders import OutputLock

    datasets = datasets if datasets is not None else load_datasets(recipe)
    output_dir = Path(recipe.output_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0
    lock = OutputLock(output_dir)
    if main_process:
        lock.acquire()
    try:
        last = get_last_checkpoint(str(output_dir)) if recipe.resume and output_dir.is_dir() else None
        settings = json_settings(recipe)
        record = output_dir / "training_config.json"
        if last is not None and record.is_file():
            saved = json.loads(record.read_text())
            changed = changed_settings(saved, settings)
            if changed and not recipe.allow_changed_settings:
                raise TrainingSetupError(
                    f"{last} was written with other settings: {changed} differ; expected the same recipe to resume. "
                    "Set allow_changed_settings=true (--allow-changed-settings) or use another output_dir")
        if main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(settings, indent=2))
        args = trainer_arguments(recipe, **argument_overrides)
        trainer = build_trainer(recipe, args, datasets=datasets)
        trainer.train(resume_from_checkpoint=last)
        metrics = trainer.evaluate() if trainer.eval_view is not None else {}
        if trainer.is_world_process_zero():
            with atomic_folder(output_dir / "final", overwrite=True) as staging:
                trainer.save_model(str(staging))
        history = [{k: v for k, v in entry.items()} for entry in trainer.state.log_history]
        return {"output_dir": str(output_dir), "best_miou": metrics.get("eval_mIoU", -1.0), "history": history,
                "num_processes": args.world_size,
                "effective_batch_size": args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps}
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit("the Trainer path runs as: detris train --config RECIPE --trainer hf (or python -m training.train ... --trainer hf)")
