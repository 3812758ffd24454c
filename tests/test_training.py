"""The accelerate training loop: checkpoints, resume after SIGKILL, NaN stop, several CPU processes, Trainer path,
and `detris eval`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from training import checkpointing
from training.train import NonFiniteLossError, build_model, load_datasets, train
from training_helpers import TINY_RECIPE, tiny_recipe

TESTS = Path(__file__).parent
ROOT = TESTS.parent


@pytest.fixture(scope="module")
def tiny_data():
    return load_datasets(tiny_recipe("unused"))


def test_training_writes_checkpoints_and_loadable_models(tmp_path, tiny_data):
    cfg = tiny_recipe(tmp_path / "run", checkpoint_every_steps=2, log_with="tensorboard")
    summary = train(cfg, datasets=tiny_data)
    assert list((tmp_path / "run").rglob("events.out.tfevents.*")), "TensorBoard logs are written"
    assert len(summary["history"]) == 2 and "val/mIoU" in summary["history"][-1]
    assert summary["effective_batch_size"] == 4
    latest = checkpointing.latest_checkpoint(tmp_path / "run")
    state = load_file(str(latest / "model.safetensors"))
    model = AutoModel.from_pretrained(tmp_path / "run" / "final")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not frozen & set(state), "a checkpoint must not hold the frozen backbone"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(state)
    assert any("running_mean" in k and ".detris_" in k for k in state), "adapter BatchNorm statistics are saved"
    assert len(checkpointing.list_checkpoints(tmp_path / "run")) <= cfg.keep_checkpoints
    AutoProcessor.from_pretrained(tmp_path / "run" / "best")
    torch.testing.assert_close(model.state_dict()[sorted(trainable)[0]], state[sorted(trainable)[0]])


def test_partial_checkpoints_never_look_valid(tmp_path):
    (tmp_path / "checkpoint-00000004.tmp-123").mkdir()
    (tmp_path / "checkpoint-00000004.tmp-123" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "checkpoint-00000006").mkdir()  # renamed but no COMPLETE marker: not valid either
    assert checkpointing.latest_checkpoint(tmp_path) is None


def _write_recipe(path: Path, output_dir: Path, **overrides):
    settings = dict(TINY_RECIPE, output_dir=str(output_dir))
    settings.update(overrides)
    path.write_text(yaml.safe_dump(settings))
    return path


def _run(recipe):
    # One thread each: the two runs must compute identically, and a busy machine must not oversubscribe the cores.
    return subprocess.Popen([sys.executable, "-m", "training.train", "--config", str(recipe)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path):
    common = dict(epochs=3, milestones=[2], checkpoint_every_steps=3, keep_checkpoints=50,
                  refshapes=dict(seed=3, image_size=64, n_train=16, n_validation=2, n_test=2),
                  model_config=dict(TINY_RECIPE["model_config"], vision_adapter_attention_dropout=0.1, decoder_dropout=0.1))
    reference = _run(_write_recipe(tmp_path / "a.yaml", tmp_path / "a", **common))
    assert reference.wait(timeout=600) == 0, reference.stdout.read().decode()[-3000:]

    recipe = _write_recipe(tmp_path / "b.yaml", tmp_path / "b", **common)
    victim = _run(recipe)
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        found = checkpointing.list_checkpoints(tmp_path / "b")
        if found and 3 <= int(found[-1].name.split("-")[1]) and json.loads((found[-1] / "progress.json").read_text())["step_in_epoch"] > 0:
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = checkpointing.latest_checkpoint(tmp_path / "b")
    assert killed_at is not None and not (tmp_path / "b" / "final").exists()
    resumed = _run(recipe)
    output = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, output[-3000:]
    assert "resumed from" in output
    expected = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    actual = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data):
    cfg = tiny_recipe(tmp_path / "run", epochs=3, checkpoint_every_steps=2, log_every_steps=3)
    model = build_model(cfg)
    calls = {"n": 0}

    def poison(module, args, output):  # training forwards only: from the 8th on, the logits are NaN
        if not module.training:
            return output
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 7 else output

    model.projector.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        train(cfg, model=model, datasets=tiny_data)
    latest = checkpointing.latest_checkpoint(tmp_path / "run")
    assert latest is not None
    state = load_file(str(latest / "model.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    assert json.loads((latest / "progress.json").read_text())["global_step"] <= 7


def test_two_cpu_processes_train_identically_and_evaluate_each_sample_once(tmp_path):
    report = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(TESTS / "dist_train_check.py"), str(tmp_path / "run"), str(report), str(TESTS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    findings = json.loads(report.read_text())
    assert findings["num_processes"] == 2 and findings["train_processes"] == 2
    assert len(set(findings["digests"])) == 1, "ranks ended with different parameters"
    assert findings["eval_samples"] == findings["dataset_samples"] == findings["per_sample"]


def test_trainer_path_trains_evaluates_and_reloads(tmp_path, tiny_data):
    from training.hf_trainer import build_trainer, trainer_arguments

    recipe = tiny_recipe(tmp_path / "trainer")
    args = trainer_arguments(recipe, num_train_epochs=1, use_cpu=True, save_strategy="epoch", eval_strategy="epoch")
    trainer = build_trainer(recipe, args, datasets=tiny_data)
    result = trainer.train()
    assert result.global_step > 0
    metrics = trainer.evaluate()
    assert {"eval_mIoU", "eval_oIoU", "eval_Pr@50", "eval_num_samples"} <= set(metrics)
    checkpoint = sorted((tmp_path / "trainer").glob("checkpoint-*"))[-1]
    reloaded = AutoModel.from_pretrained(checkpoint).eval()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"]).logits
        actual = reloaded(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(actual, expected)


def test_detris_eval_writes_tables_equal_to_the_accumulator(tmp_path, tiny_data):
    from processing_detris.metrics import ReferringSegmentationMetric, intersection_and_union
    from training.cli import main as cli
    from training.evaluation import sentence_view
    from training.train import build_processor
    from training.data.collate import processor_image
    from training.data.masks import decode_rle

    torch.manual_seed(0)
    model = build_model(tiny_recipe(tmp_path)).eval()
    processor = build_processor(model)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    tiny_data.save_to_disk(str(tmp_path / "data"))
    assert cli(["eval", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data"), "--splits",
                "validation,test", "--output", str(tmp_path / "eval"), "--batch-size", "3", "--grid", "4"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    table = (tmp_path / "eval" / "results.md").read_text()
    for split in ("validation", "test"):
        metric = ReferringSegmentationMetric()
        for row in sentence_view(tiny_data[split], "all"):
            inputs = processor(images=processor_image(row["image"]), text=row["sentence"], return_tensors="pt")
            with torch.no_grad():
                logits = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"]).logits
            mask = processor.post_process_referring_segmentation(logits, inputs["original_sizes"])
            metric.update(mask, [torch.from_numpy(decode_rle(row["mask"]).astype(bool))])
        expected = metric.compute()
        for key, value in expected.items():
            assert results[split][key] == pytest.approx(value, abs=1e-12), (split, key)
        assert f"| {split} | {int(expected['num_samples'])} | {100 * expected['mIoU']:.2f} |" in table
        assert (tmp_path / "eval" / f"{split}_best.png").exists() and (tmp_path / "eval" / f"{split}_worst.png").exists()


@pytest.mark.parametrize("implementation", ["fused", "foreach", "for-loop"])
def test_adam_implementations_take_the_same_step(tmp_path, implementation):
    """The three Adam implementations a recipe can pick give the same update (within float rounding); fused is the
    default. Anything else is refused with the choices."""
    from training.train import build_optimizer

    cfg = tiny_recipe(tmp_path / "run", optimizer_implementation=implementation)
    torch.manual_seed(0)
    model = build_model(cfg)
    reference = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(model, cfg)
    expected = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[implementation]
    assert all(group[key] == value for group in optimizer.param_groups for key, value in expected.items())
    for step in range(3):
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.grad = torch.full_like(parameter, 0.01 * (step + 1)) * (1 + (hash(name) % 7))
        optimizer.step()
    plain = torch.optim.Adam(list(reference.values()), lr=cfg.learning_rate, foreach=False)
    names = list(reference)
    for step in range(3):
        for name in names:
            reference[name].grad = torch.full_like(reference[name], 0.01 * (step + 1)) * (1 + (hash(name) % 7))
        plain.step()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.detach(), reference[name], rtol=1e-6, atol=1e-7)
    assert tiny_recipe(tmp_path / "x").optimizer_implementation == "fused"
    with pytest.raises(ValueError, match="optimizer_implementation must be one of .* got 'sgd'"):
        tiny_recipe(tmp_path / "y", optimizer_implementation="sgd")
