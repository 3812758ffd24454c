"""The accelerate training loop: checkpoints, resume after SIGKILL, NaN stop, several CPU processes, Trainer path,
and `detris eval`."""

import json
import os
import re
import shutil
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
from modeling_detris.peft_detris import is_adapter_key

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
    assert any("running_mean" in k and is_adapter_key(k) for k in state), "adapter BatchNorm statistics are saved"
    assert len(checkpointing.list_checkpoints(tmp_path / "run")) <= cfg.keep_checkpoints
    AutoProcessor.from_pretrained(tmp_path / "run" / "best")
    torch.testing.assert_close(model.state_dict()[sorted(trainable)[0]], state[sorted(trainable)[0]])


def test_partial_checkpoints_never_look_valid(tmp_path):
    (tmp_path / "checkpoint-00000004.tmp-123").mkdir()
    (tmp_path / "checkpoint-00000004.tmp-123" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "checkpoint-00000006").mkdir()  # renamed but no COMPLETE marker: not valid either
    (tmp_path / ".checkpoint-00000008.partial").mkdir()  # a staging folder, complete or not
    (tmp_path / ".checkpoint-00000008.partial" / "COMPLETE").write_text("ok\n")
    assert checkpointing.latest_checkpoint(tmp_path) is None
    checkpointing.prune_checkpoints(tmp_path, keep=2)  # a later checkpoint write removes what a killed run left
    assert not (tmp_path / ".checkpoint-00000008.partial").exists()


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
    from processing_detris.metrics import ReferringSegmentationMetric
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


# ----- reliability: what a run refuses, what it never loads, what it never leaves half-written -------------------
class _RunsCode:
    """Unpickling this runs `open(path, "w")`: a stand-in for any code a crafted checkpoint could carry."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _checkpointed_run(tmp_path, tiny_data, **overrides):
    cfg = tiny_recipe(tmp_path / "run", epochs=1, checkpoint_every_steps=1, keep_checkpoints=5, **overrides)
    train(cfg, datasets=tiny_data)
    return cfg


def test_resume_never_unpickles_code(tmp_path, tiny_data, capsys):
    cfg = _checkpointed_run(tmp_path, tiny_data)
    marker = tmp_path / "code-ran"
    for checkpoint in checkpointing.list_checkpoints(tmp_path / "run"):
        for item in checkpoint.iterdir():  # every pickled file of every checkpoint carries code
            if item.suffix in (".pt", ".bin", ".pkl"):
                torch.save({"state": _RunsCode(str(marker))}, item)
        torch.save(_RunsCode(str(marker)), checkpoint / "custom_checkpoint_0.pkl")
    alone = tmp_path / "alone"
    shutil.copytree(checkpoint, alone)
    (alone / "custom_checkpoint_0.pkl").unlink()  # without the extra file: the crafted optimizer.bin is refused
    with pytest.raises(checkpointing.CorruptCheckpointError, match="optimizer.bin: cannot be read"):
        checkpointing.verify_checkpoint(alone, set(load_file(str(alone / "model.safetensors"))), 1)
    cfg.epochs = 2
    cfg.allow_changed_settings = True
    capsys.readouterr()
    train(cfg, datasets=tiny_data)
    assert not marker.exists(), "resuming ran code from a checkpoint"
    assert "custom_checkpoint_0.pkl" in capsys.readouterr().out  # each refusal is reported


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, tiny_data, capsys):
    _checkpointed_run(tmp_path, tiny_data)
    found = checkpointing.list_checkpoints(tmp_path / "run")
    newest = found[-1]
    for item in newest.glob("*.safetensors"):
        item.write_bytes(item.read_bytes()[:100])
    model = build_model(tiny_recipe(tmp_path))
    expected = set(checkpointing.trainable_state_dict(model))
    path, progress = checkpointing.newest_usable_checkpoint(tmp_path / "run", expected, 1)
    assert path == found[-2] and progress["global_step"] == int(found[-2].name.split("-")[1])
    assert f"skipping checkpoint {newest.name}: {newest / 'model.safetensors'}: cannot be read" in capsys.readouterr().out


@pytest.mark.parametrize("setting, value, message", [
    ("max_grad_norm", -1, "max_grad_norm must be > 0, or 0 for no clipping"),
    ("log_every_steps", 0, "log_every_steps must be >= 1"),
    ("gamma", float("nan"), "gamma must be a finite number"),
    ("learning_rate", float("inf"), "learning_rate must be a finite number"),
    ("weight_decay", -0.1, "weight_decay must be >= 0"),
    ("epochs", 1.5, "epochs must be an integer"),
    ("keep_checkpoints", 0, "keep_checkpoints must be >= 1"),
    ("per_device_batch_size", 0, "per_device_batch_size must be >= 1"),
    ("milestones", [0, 2], "milestones must be a list of epochs >= 1"),
    ("milestones", [2, 2], "milestones must be strictly increasing"),
    ("resume", "yes", "resume must be true or false"),
    ("gamma", 2.0, r"gamma must be in \(0, 1\]"),
])
def test_every_recipe_number_is_validated(tmp_path, setting, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_recipe(tmp_path, **{setting: value})
    assert tiny_recipe(tmp_path, max_grad_norm=0).max_grad_norm == 0.0  # 0 = no clipping, the documented 'off'


def test_resume_with_changed_settings_refuses_unless_allowed(tmp_path, tiny_data, capsys):
    from training.train import TrainingSetupError, main

    cfg = _checkpointed_run(tmp_path, tiny_data)
    cfg.learning_rate, cfg.seed = 0.01, 5
    with pytest.raises(TrainingSetupError, match=r"\['learning_rate', 'seed'\] differ"):
        train(cfg, datasets=tiny_data)
    recipe = _write_recipe(tmp_path / "r.yaml", tmp_path / "run", epochs=1, checkpoint_every_steps=1, keep_checkpoints=5,
                           learning_rate=0.01)
    capsys.readouterr()
    assert main(["--config", str(recipe)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars: one line, no traceback
    assert error.startswith("detris train:") and "'learning_rate'" in error and "--allow-changed-settings" in error
    cfg.seed, cfg.epochs, cfg.allow_changed_settings = 0, 2, True
    train(cfg, datasets=tiny_data)
    progress = json.loads((checkpointing.latest_checkpoint(tmp_path / "run") / "progress.json").read_text())
    assert progress["settings_changes"][0]["changed"] == {"epochs": [1, 2], "learning_rate": [1e-3, 0.01]}
    saved = json.loads((checkpointing.latest_checkpoint(tmp_path / "run") / "training_config.json").read_text())
    assert saved["learning_rate"] == 0.01 and saved["epochs"] == 2


def test_resume_after_a_batch_size_change_skips_the_samples_already_seen(tmp_path, tiny_data, monkeypatch):
    import training.train as train_module
    from training.train import TrainingSetupError

    cfg = tiny_recipe(tmp_path / "run", epochs=1, per_device_batch_size=2, checkpoint_every_steps=2, keep_checkpoints=9)
    original = train_module.build_model

    def stopped_at_step(limit):
        def build(recipe):
            model, calls = original(recipe), {"n": 0}

            def stop(module, args):
                if module.training:
                    calls["n"] += 1
                    if calls["n"] > limit:
                        raise KeyboardInterrupt("simulated kill")

            model.register_forward_pre_hook(stop)
            return model
        return build

    monkeypatch.setattr(train_module, "build_model", stopped_at_step(2))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, datasets=tiny_data)
    monkeypatch.setattr(train_module, "build_model", original)
    assert json.loads((checkpointing.latest_checkpoint(tmp_path / "run") / "progress.json").read_text())["samples_in_epoch"] == 4
    rows = len(tiny_data["train"])
    cfg.per_device_batch_size, cfg.allow_changed_settings = 4, True
    train(cfg, datasets=tiny_data)
    final = json.loads((checkpointing.latest_checkpoint(tmp_path / "run") / "progress.json").read_text())
    assert final["global_step"] == 2 + (rows // 4 - 1), "4 samples seen = 1 step of 4 skipped, not 2"
    # a batch that does not divide the samples seen is refused, naming both
    second = tmp_path / "run2"
    cfg2 = tiny_recipe(second, epochs=1, per_device_batch_size=2, checkpoint_every_steps=1, keep_checkpoints=9)
    monkeypatch.setattr(train_module, "build_model", stopped_at_step(1))
    with pytest.raises(KeyboardInterrupt):
        train(cfg2, datasets=tiny_data)
    monkeypatch.setattr(train_module, "build_model", original)
    cfg2.per_device_batch_size, cfg2.allow_changed_settings = 4, True
    with pytest.raises(TrainingSetupError, match="after 2 samples .* not a multiple of this run's 4 samples per step"):
        train(cfg2, datasets=tiny_data)


def test_a_second_run_in_the_same_output_dir_is_refused_naming_the_holder(tmp_path, tiny_data):
    import socket

    from training.folders import FolderInUseError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    with pytest.raises(FolderInUseError, match=f"in use by another run \\(pid {os.getpid()} on {socket.gethostname()}"):
        train(tiny_recipe(tmp_path / "run", epochs=1), datasets=tiny_data)
    assert not (tmp_path / "run" / "final").exists()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": int(finished.stdout), "host": socket.gethostname()}))
    train(tiny_recipe(tmp_path / "run", epochs=1), datasets=tiny_data)  # a lock left by a dead process is taken over
    assert (tmp_path / "run" / "final").is_dir() and not (tmp_path / "run" / ".lock").exists()


def test_final_and_best_are_written_whole_or_not_at_all(tmp_path, tiny_data, monkeypatch):
    from processing_detris import DetrisProcessor

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DetrisProcessor, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_recipe(tmp_path / "run", epochs=1), datasets=tiny_data)
    leftovers = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "best" not in leftovers and "final" not in leftovers and not [n for n in leftovers if "partial" in n]


def test_train_checks_the_dataset_before_building_the_model(tmp_path, monkeypatch, capsys):
    import training.train as train_module

    def never(cfg):
        raise AssertionError("the model was built before the dataset was checked")

    monkeypatch.setattr(train_module, "build_model", never)
    recipe = _write_recipe(tmp_path / "r.yaml", tmp_path / "run", dataset=str(tmp_path / "data" / "refcoco"))
    assert train_module.main(["--config", str(recipe)]) == 2
    error = capsys.readouterr().err.strip()
    assert "does not exist" in error and "detris data refer" in error and len(error.splitlines()) == 1


def test_validation_miou_is_logged_in_the_unit_of_the_summary(tmp_path, tiny_data, capsys):
    summary = train(tiny_recipe(tmp_path / "run", epochs=1), datasets=tiny_data)
    printed = re.search(r"epoch 1: val mIoU ([0-9.]+)", capsys.readouterr().out).group(1)
    assert float(printed) == pytest.approx(summary["history"][-1]["val/mIoU"], abs=5e-5)


@pytest.mark.parametrize("command", ["train", "eval", "demo", "reproduce", "data", "data refshapes", "data custom"])
def test_subcommand_help_imports_neither_torch_nor_transformers(command):
    code = ("import sys\nfrom training.cli import main\ntry:\n    main(sys.argv[1:] + ['--help'])\nexcept SystemExit:\n"
            "    pass\nprint('HEAVY', sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, *command.split()], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert "usage: detris" in result.stdout and "HEAVY []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def test_eval_defaults_to_the_datasets_evaluation_split(tmp_path, tiny_data):
    from training.cli import main as cli
    from training.train import build_processor

    model = build_model(tiny_recipe(tmp_path))
    model.save_pretrained(tmp_path / "model")
    build_processor(model).save_pretrained(tmp_path / "model")
    tiny_data.save_to_disk(str(tmp_path / "data"))
    assert cli(["eval", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data"), "--grid", "0"]) == 0
    assert list(json.loads((tmp_path / "model" / "eval" / "results.json").read_text())) == ["validation"]
    assert cli(["eval", "--model", str(tmp_path / "nothing"), "--dataset", str(tmp_path / "data")]) == 2


def test_trainer_path_is_a_full_peer(tmp_path, tiny_data, monkeypatch):
    import training.hf_trainer as hf

    recipe = tiny_recipe(tmp_path / "hf", epochs=1, trainer="hf")
    summary = hf.train_with_trainer(recipe, datasets=tiny_data, use_cpu=True)
    final = tmp_path / "hf" / "final"
    assert summary["effective_batch_size"] == 4
    checkpoint = sorted((tmp_path / "hf").glob("checkpoint-*"))[-1]
    for folder in (final, checkpoint):
        AutoProcessor.from_pretrained(folder)  # processor files beside the weights
        AutoModel.from_pretrained(folder)
    steps = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    original, forwards = hf.build_model, {"n": 0}

    def counted(cfg):
        model = original(cfg)
        model.register_forward_pre_hook(lambda module, args: forwards.__setitem__("n", forwards["n"] + module.training))
        return model

    monkeypatch.setattr(hf, "build_model", counted)
    recipe.epochs, recipe.allow_changed_settings = 2, True
    hf.train_with_trainer(recipe, datasets=tiny_data, use_cpu=True)
    assert forwards["n"] == steps, "the second run resumed after the first epoch instead of starting over"
    help_text = subprocess.run([sys.executable, "-m", "training.cli", "train", "--help"], cwd=ROOT, capture_output=True,
                               text=True).stdout
    assert "--trainer {accelerate,hf}" in help_text


def test_both_trainers_read_the_letterbox_cache_with_identical_results(tmp_path, tiny_data):
    from training.cli import main as cli
    from training.hf_trainer import build_trainer, trainer_arguments
    from training.train import build_processor

    processor_dir = tmp_path / "processor"
    build_processor(build_model(tiny_recipe(tmp_path))).save_pretrained(processor_dir)
    tiny_data.save_to_disk(str(tmp_path / "data"))
    assert cli(["data", "cache", "--dataset-dir", str(tmp_path / "data"), "--split", "train", "--processor",
                str(processor_dir), "--output", str(tmp_path / "cache"), "--no-progress"]) == 0
    finals = []
    for name, cache in (("plain", None), ("cached", str(tmp_path / "cache"))):
        train(tiny_recipe(tmp_path / name, epochs=1, eval_split=None, letterbox_cache=cache), datasets=tiny_data)
        finals.append(load_file(str(tmp_path / name / "final" / "model.safetensors")))
    for key in finals[0]:
        torch.testing.assert_close(finals[1][key], finals[0][key], rtol=0, atol=0, msg=key)
    recipe = tiny_recipe(tmp_path / "hf", epochs=1, letterbox_cache=str(tmp_path / "cache"))
    trainer = build_trainer(recipe, trainer_arguments(recipe, use_cpu=True), datasets=tiny_data)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["pixel_values"].dtype == torch.float32 and batch["labels"].dtype == torch.float32
    assert batch["input_ids"].shape[-1] == recipe.model_config["word_len"]


def test_both_trainers_take_batch_and_logging_from_the_same_recipe(tmp_path, monkeypatch):
    from training.hf_trainer import trainer_arguments
    from training.recipes import batch_plan

    recipe = tiny_recipe(tmp_path, total_batch_size=8, gradient_accumulation_steps=2, log_with="tensorboard",
                         log_every_steps=7, max_grad_norm=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = trainer_arguments(recipe)
    assert batch_plan(recipe, 2) == (2, 8)  # the total batch divided over 2 processes x 2 accumulation steps
    assert args.per_device_train_batch_size == 2 and args.gradient_accumulation_steps == 2
    assert args.report_to == ["tensorboard"] and args.logging_steps == 7 and args.max_grad_norm == 0


def test_recipe_mistakes_at_the_command_line_end_in_one_line(tmp_path, capsys):
    from training.train import main

    recipe = _write_recipe(tmp_path / "r.yaml", tmp_path / "run")
    for arguments in (["--set", "max_grad_norm=-1"], ["--set", "no_such_setting=1"], ["--set", "log_every_steps=0"]):
        assert main(["--config", str(recipe), *arguments]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("detris train:") and len(error.splitlines()) == 1, error
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not a file, and not a preset" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
