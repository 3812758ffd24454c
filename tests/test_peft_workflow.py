"""The DETRIS PEFT workflow across processes: adapter folders loaded in a fresh Python process (three routes), the
behaviour without our package imported, and `Trainer` checkpoints that hold only the adapter and resume."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from conftest import tiny_config, tiny_inputs
from modeling_detris import DetrisAdapterConfig, DetrisForReferringSegmentation
from modeling_detris.peft_detris import is_adapter_key

REPO = Path(__file__).resolve().parents[1]

FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import torch

    adapter_dir, base_dir, reference_path, result_path = sys.argv[1:]
    result = {}

    # 1. Our package not imported: peft cannot read the adapter config, transformers does not know the model.
    from peft import PeftConfig
    from transformers import AutoModel
    try:
        PeftConfig.from_pretrained(adapter_dir)
        result["peft_config_without_import"] = "loaded"
    except Exception as error:
        result["peft_config_without_import"] = f"{type(error).__name__}: {error}"
    try:
        AutoModel.from_pretrained(adapter_dir)
        result["auto_model_without_import"] = "loaded"
    except Exception as error:
        result["auto_model_without_import"] = f"{type(error).__name__}: {error}"

    # 2. With the import: three loading routes.
    import modeling_detris  # registers DetrisConfig / DetrisForReferringSegmentation and peft_type DETRIS
    from modeling_detris import DetrisForReferringSegmentation
    from peft import PeftModel

    reference = torch.load(reference_path)

    def diff(model):
        model.eval()
        with torch.no_grad():
            logits = model(pixel_values=reference["pixel_values"], input_ids=reference["input_ids"]).logits
        return (logits - reference["logits"]).abs().max().item()

    base = DetrisForReferringSegmentation.from_pretrained(base_dir)
    result["peft_model_from_pretrained"] = diff(PeftModel.from_pretrained(base, adapter_dir))

    model = AutoModel.from_pretrained(base_dir)
    model.load_adapter(adapter_dir)
    result["load_adapter"] = diff(model)

    model = AutoModel.from_pretrained(adapter_dir)
    result["auto_model_from_adapter_dir"] = diff(model)
    result["auto_model_class"] = type(model).__name__
    result["plain_base"] = diff(DetrisForReferringSegmentation.from_pretrained(base_dir))

    with open(result_path, "w") as handle:
        json.dump(result, handle)
    """
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_this_module(one_thread):
    yield


def run_fresh_python(script: str, *args) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    completed = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-4000:]


def config(**overrides):
    settings = dict(adapters_in_model=False, vision_adapter_attention_dropout=0.0, decoder_dropout=0.0)
    settings.update(overrides)
    return tiny_config(**settings)


def test_adapter_folder_loads_identically_in_a_fresh_process(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    torch.manual_seed(0)
    DetrisForReferringSegmentation(config()).save_pretrained(base_dir)
    base = DetrisForReferringSegmentation.from_pretrained(base_dir)
    model = get_peft_model(base, DetrisAdapterConfig.from_model_config(base.config))
    pixel_values, input_ids, _ = tiny_inputs(base.config)
    model.train()  # move the BatchNorm statistics, which must then travel with the adapter
    with torch.no_grad():
        model(pixel_values=2 * pixel_values + 1, input_ids=input_ids)
        for param in model.get_base_model().decoder.modules_to_save["default"].parameters():
            param.add_(0.01)  # and a head copy that differs from the base's head
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, input_ids=input_ids).logits
    model.save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "DETRIS" and saved["base_model_name_or_path"] == str(base_dir)
    reference = tmp_path / "reference.pt"
    torch.save(dict(pixel_values=pixel_values, input_ids=input_ids, logits=expected), reference)

    result_path = tmp_path / "result.json"
    run_fresh_python(FRESH_PROCESS, adapter_dir, base_dir, reference, result_path)
    result = json.loads(result_path.read_text())

    assert result["peft_config_without_import"] == "KeyError: 'DETRIS'"
    # transformers reads the base config first (base_model_name_or_path) and does not know model_type "detris".
    assert result["auto_model_without_import"].startswith(
        "ValueError: The checkpoint you are trying to load has model type `detris` but Transformers does not recognize"
    )
    assert result["peft_model_from_pretrained"] == 0.0
    assert result["load_adapter"] == 0.0
    assert result["auto_model_from_adapter_dir"] == 0.0
    assert result["auto_model_class"] == "DetrisForReferringSegmentation"
    assert result["plain_base"] > 1e-3  # the adapter really changes the outputs


def test_trainer_checkpoints_hold_only_the_adapter_and_resume(tmp_path):
    model_config = config()
    pixel_values, input_ids, labels = tiny_inputs(model_config, batch=4)
    rows = [dict(pixel_values=pixel_values[i], input_ids=input_ids[i], labels=labels[i]) for i in range(4)]

    def peft_model():
        torch.manual_seed(0)
        return get_peft_model(DetrisForReferringSegmentation(model_config), DetrisAdapterConfig.from_model_config(model_config))

    def arguments(output_dir):
        return TrainingArguments(
            output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, save_strategy="steps", save_steps=1,
            learning_rate=1e-3, seed=0, use_cpu=True, report_to=[], remove_unused_columns=False, logging_strategy="no",
            dataloader_num_workers=0, disable_tqdm=True,
        )

    straight = peft_model()
    Trainer(model=straight, args=arguments(tmp_path / "straight"), train_dataset=rows).train()
    checkpoint = tmp_path / "straight" / "checkpoint-1"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not any(name.startswith(("model.safetensors", "pytorch_model")) for name in files), files
    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert all(is_adapter_key(k) or k.startswith(("base_model.model.neck.", "base_model.model.decoder.", "base_model.model.projector.")) for k in saved)

    resumed = peft_model()
    Trainer(model=resumed, args=arguments(tmp_path / "resumed"), train_dataset=rows).train(resume_from_checkpoint=str(checkpoint))
    after_step_2 = straight.state_dict()
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, after_step_2[key], msg=key)
    untrained = peft_model().state_dict()
    key = "base_model.model.vision_model.encoder.layer.1.mlp.detris_dense_aligner.default.up_proj.weight"
    assert not torch.equal(after_step_2[key], untrained[key])


ADAPTERS_ONLY_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import torch

    import modeling_detris  # noqa: F401  (registers the model and peft_type DETRIS)
    from modeling_detris import DetrisForReferringSegmentation
    from peft import PeftModel

    adapter_dir, base_dir, reference_path, result_path = sys.argv[1:]
    reference = torch.load(reference_path)
    model = PeftModel.from_pretrained(DetrisForReferringSegmentation.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        logits = model(pixel_values=reference["pixel_values"], input_ids=reference["input_ids"]).logits
    with open(result_path, "w") as handle:
        json.dump({"max_abs_diff": (logits - reference["logits"]).abs().max().item()}, handle)
    """
)


def test_adapters_only_run_leaves_the_frozen_head_untouched_and_reloads_exactly(tmp_path):
    """`modules_to_save=None`: the head is frozen, so training must not move its BatchNorm statistics (they are not
    in the adapter file). The saved adapter, reloaded in a fresh process onto the saved base, gives the trained model's
    logits exactly, and with the adapters disabled the model is still the original base."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    torch.manual_seed(0)
    DetrisForReferringSegmentation(config()).save_pretrained(base_dir)
    original = DetrisForReferringSegmentation.from_pretrained(base_dir).eval()
    model = get_peft_model(DetrisForReferringSegmentation.from_pretrained(base_dir),
                           DetrisAdapterConfig.from_model_config(original.config, modules_to_save=None))
    pixel_values, input_ids, labels = tiny_inputs(original.config)
    head_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if k.startswith(("neck.", "decoder.", "projector."))}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for step in range(3):
        optimizer.zero_grad()
        model(pixel_values=pixel_values + step, input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
    head_after = {k: v for k, v in model.get_base_model().state_dict().items() if k in head_before}
    assert any("running_mean" in k for k in head_before)
    assert all(torch.equal(head_before[k], head_after[k]) for k in head_before), "the frozen head's BatchNorm statistics moved"
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, input_ids=input_ids).logits
        with model.disable_adapter():
            disabled = model(pixel_values=pixel_values, input_ids=input_ids).logits
        base_logits = original(pixel_values=pixel_values, input_ids=input_ids).logits
    assert torch.equal(disabled, base_logits)
    model.save_pretrained(adapter_dir)
    reference = tmp_path / "reference.pt"
    torch.save(dict(pixel_values=pixel_values, input_ids=input_ids, logits=expected), reference)
    run_fresh_python(ADAPTERS_ONLY_FRESH_PROCESS, adapter_dir, base_dir, reference, tmp_path / "result.json")
    assert json.loads((tmp_path / "result.json").read_text())["max_abs_diff"] == 0.0
