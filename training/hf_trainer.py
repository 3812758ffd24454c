"""Train DETRIS with `transformers.Trainer`: the same model, data and recipe as `training.train`.

    python -m training.hf_trainer --config refcoco-base --output_dir runs/trainer [any TrainingArguments flag]

`DetrisTrainer` sets the official optimiser (Adam, two groups, no weight decay) and the per-epoch MultiStep decay,
and evaluates with the official protocol: logits are post-processed batch by batch and only per-sample
intersection / union counts are kept, never the full-resolution logits.
"""

import sys

import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from training.evaluation import eval_loader, evaluate_model, sentence_view
from training.recipes import TrainingConfig, load_training_config
from training.train import OneSentencePerObject, build_model, build_optimizer, build_processor, load_datasets


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
    model = model if model is not None else build_model(recipe)
    processor = build_processor(model)
    datasets = datasets if datasets is not None else load_datasets(recipe)
    rows = OneSentencePerObject(datasets[recipe.train_split], recipe.seed)
    eval_view = None
    if recipe.eval_split and recipe.eval_split in datasets:
        eval_view = sentence_view(datasets[recipe.eval_split], recipe.eval_sentences, recipe.max_eval_samples)
    from training.data import DetrisDataCollator

    return DetrisTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        eval_dataset=eval_view,
        data_collator=DetrisDataCollator(processor, train=True, seed=recipe.seed),
        callbacks=[_EpochSetter(rows)],
        recipe=recipe,
        processor=processor,
        eval_view=eval_view,
    )


def trainer_arguments(recipe: TrainingConfig, **overrides) -> TrainingArguments:
    """TrainingArguments that follow the recipe (epochs, batch, precision, seed); `overrides` win."""
    settings = dict(
        output_dir=recipe.output_dir,
        num_train_epochs=recipe.epochs,
        per_device_train_batch_size=recipe.per_device_batch_size or recipe.total_batch_size,
        per_device_eval_batch_size=recipe.per_device_batch_size or recipe.total_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm or 0.0,
        bf16=recipe.mixed_precision == "bf16",
        fp16=recipe.mixed_precision == "fp16",
        seed=recipe.seed,
        remove_unused_columns=False,
        dataloader_drop_last=True,
        eval_strategy="epoch",
        save_strategy="epoch",
        metric_for_best_model="eval_mIoU",
        greater_is_better=True,
        logging_steps=recipe.log_every_steps,
        report_to="none",
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        print("usage: python -m training.hf_trainer --config RECIPE [--set KEY=VALUE ...] [TrainingArguments flags]", file=sys.stderr)
        return 2
    index = argv.index("--config")
    recipe_name = argv[index + 1]
    rest = argv[:index] + argv[index + 2:]
    sets = []
    while "--set" in rest:
        i = rest.index("--set")
        sets.append(rest[i + 1])
        rest = rest[:i] + rest[i + 2:]
    recipe = load_training_config(recipe_name, sets)
    defaults = trainer_arguments(recipe).to_dict()
    (overrides,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(rest, look_for_args_file=False) if rest else (None,)
    args = trainer_arguments(recipe, **({k: getattr(overrides, k) for k in defaults if f"--{k}" in " ".join(rest)} if overrides else {}))
    trainer = build_trainer(recipe, args)
    trainer.train()
    print(trainer.evaluate())
    return 0


if __name__ == "__main__":
    sys.exit(main())
