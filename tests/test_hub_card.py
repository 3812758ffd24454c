"""Model cards: metadata + model-index from the evaluation JSON, parameter counts, adapter cards, the snippet."""

import json

import pytest
import torch
from huggingface_hub import ModelCard

from hub_helpers import save_tiny_model, write_test_image

import hub_card  # noqa: F401
from hub_card.card import build_model_card, card_for_folder, usage_snippet
from hub_card.eval_results import EvalResultsError, parse_eval_results
from training.cli import main as cli

EVAL = [
    {
        "dataset": "refcoco",
        "results": {
            "val": {"mIoU": 0.7601, "oIoU": 0.7432, "Pr@50": 0.871, "Pr@0.9": 0.33, "num_samples": 10834},
            "testA": {"mIoU": 0.782, "oIoU": 0.776, "num_samples": 5657},
        },
    },
    {"dataset": "refcocog_u", "units": "percent", "source": {"name": "paper", "url": "https://arxiv.org/abs/2501.08580"},
     "results": {"test": {"mIoU": 68.1}}},
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("card") / "model")


def test_card_from_eval_json_parses_back_with_the_model_index(tiny_model_dir, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(EVAL))
    readme = tmp_path / "README.md"
    assert cli(["card", "--model", str(tiny_model_dir), "--eval-results", str(results), "--output", str(readme),
                "--repo-id", "org/detris-tiny"]) == 0
    card = ModelCard.load(readme)
    data = card.data
    assert data.license == "mit" and data.library_name == "transformers" and data.pipeline_tag == "image-segmentation"
    assert "detris" in data.tags and "jxu124/refcoco" in data.datasets and "jxu124/refcocog" in data.datasets
    entries = {(r.dataset_type, r.dataset_split, r.metric_type): r for r in data.eval_results}
    assert {(k[0], k[1], k[2]): r.metric_value for k, r in entries.items()} == {
        ("jxu124/refcoco", "val", "mIoU"): 76.01, ("jxu124/refcoco", "val", "oIoU"): 74.32,
        ("jxu124/refcoco", "val", "Pr@50"): 87.1, ("jxu124/refcoco", "val", "Pr@90"): 33.0,
        ("jxu124/refcoco", "testA", "mIoU"): 78.2, ("jxu124/refcoco", "testA", "oIoU"): 77.6,
        ("jxu124/refcocog", "test", "mIoU"): 68.1,
    }
    assert entries[("jxu124/refcocog", "test", "mIoU")].source_url == "https://arxiv.org/abs/2501.08580"
    assert data.model_name == "detris-tiny"
    text = card.text
    for needle in ("**mIoU**", "**oIoU**", "**Pr@X**", "strictly greater", "| total |", "## Training recipe",
                   "## Limitations", "@inproceedings{huang2025detris", "| val | 10,834 | 76.01 | 74.32 | 87.10 | 33.00 |"):
        assert needle in text, needle
    # The tiny model is no official size: no base_model guessed, and no reported table.
    assert data.base_model is None and "Results reported by the authors" not in text


def test_card_counts_and_metadata_of_detris_b():
    from configuration_detris import DetrisConfig
    from modeling_detris import DetrisForReferringSegmentation

    with torch.device("meta"):
        model = DetrisForReferringSegmentation(DetrisConfig.from_preset("base"))
    card = build_model_card(model, "org/detris-base-refcoco")
    assert card.data.base_model == ["facebook/dinov2-with-registers-base", "openai/clip-vit-base-patch16"]
    text = card.text
    assert "| total | 175,529,778 |" in text
    assert "| of which adapters (Dense Aligners + text adapters) | 2,715,696 (1.81 % of the frozen backbone) |" in text
    assert "| trainable | 25,518,129 |" in text
    assert "DETRIS-B as reported" in text and "| mIoU | 76.0 | 78.2 | 73.5 |" in text
    assert "MultiStepLR" in text and 'AutoModel.from_pretrained(model_id, trust_remote_code=True)' in text


@pytest.mark.parametrize(
    "data, message",
    [
        ({"dataset": "refcoco", "results": {"val": {"mIoU": 76.0}}}, 'outside \\[0, 1\\].*"units": "percent"'),
        ({"dataset": "refcoco", "results": {"val": {"dice": 0.5}}}, "unknown metric 'dice'"),
        ({"dataset": "refcoco", "results": {}}, "results must be a non-empty object"),
        ({"results": {"val": {"mIoU": 0.5}}}, "dataset must be a non-empty string"),
        ({"dataset": "refcoco", "units": "%", "results": {"val": {"mIoU": 0.5}}}, "units must be one of"),
        ({"dataset": "refcoco", "results": {"val": {"mIoU": 0.5, "num_samples": 0}}}, "num_samples must be a positive"),
        ({"dataset": "refcoco", "split": "val", "results": {"val": {"mIoU": 0.5}}}, "unknown keys \\['split'\\]"),
    ],
)
def test_eval_json_errors_name_the_value(data, message):
    with pytest.raises(EvalResultsError, match=message):
        parse_eval_results(data)


def test_card_cli_errors(tmp_path):
    assert cli(["card", "--model", str(tmp_path / "missing")]) == 2
    assert cli(["card", "--model", str(tmp_path)]) == 2  # neither config.json nor adapter_config.json


def test_package_usage_snippet_runs(tiny_model_dir, tmp_path):
    """The snippet of a card for a folder without remote code (detris-hf installed) runs as printed."""
    card = card_for_folder(tiny_model_dir, "org/detris-tiny")
    assert "import modeling_detris, processing_detris" in card.text
    image = write_test_image(tmp_path / "photo.png")
    snippet = usage_snippet(str(tiny_model_dir), remote_code=False).replace('"photo.jpg"', repr(str(image)))
    assert snippet.split("```")[0] == snippet and snippet in card.text.replace("org/detris-tiny", str(tiny_model_dir)).replace('"photo.jpg"', repr(str(image)))
    namespace = {}
    exec(snippet, namespace)
    assert len(namespace["masks"]) == 2 and tuple(namespace["masks"][0].shape) == (61, 83)


def test_adapter_folder_gets_its_own_card(tmp_path):
    """An adapter-only folder written by the DETRIS PEFT method: the card names the base model."""
    peft_detris = pytest.importorskip("modeling_detris.peft_detris")
    from peft import get_peft_model

    from modeling_detris import DetrisForReferringSegmentation
    from hub_helpers import tiny_clip_config

    base = DetrisForReferringSegmentation(tiny_clip_config(adapters_in_model=False))
    config = peft_detris.DetrisAdapterConfig.from_model_config(tiny_clip_config())
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    results = tmp_path / "results.json"
    results.write_text(json.dumps(EVAL[0]))
    assert cli(["card", "--model", str(tmp_path / "adapter"), "--eval-results", str(results), "--repo-id", "org/tiny-adapter",
                "--base-model", "org/detris-tiny-base"]) == 0
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model == "org/detris-tiny-base" and card.data.library_name == "peft"
    assert len(card.data.eval_results) == 6
    assert 'PeftModel.from_pretrained(base, "org/tiny-adapter")' in card.text
    assert f"`{adapter_config['peft_type']}`" in card.text
    # `detris export` of an adapter folder: the adapter files and the card, nothing else.
    assert cli(["export", "--model", str(tmp_path / "adapter"), "--output", str(tmp_path / "hub"),
                "--base-model", "org/detris-tiny-base"]) == 0
    assert {p.name for p in (tmp_path / "hub").iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    # Without --base-model the adapter's own base_model_name_or_path is used, or the card refuses.
    if not adapter_config.get("base_model_name_or_path"):
        assert cli(["card", "--model", str(tmp_path / "adapter")]) == 2


def test_reading_the_release_table_loads_no_model():
    """The release facts are tables: importing them loads neither the model, the processor, training, nor torch or
    transformers."""
    import subprocess
    import sys

    code = ("import sys, configuration_detris.release as r; "
            "assert r.WORD_LEN[r.canonical_dataset('refcocog_u')] == 22; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'modeling_detris', 'processing_detris', 'training', 'hub_card', 'peft', 'torch', 'transformers'}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    # taking a name from the package still registers the configuration with AutoConfig
    code = ("from configuration_detris import DetrisConfig\nfrom transformers import AutoConfig\n"
            "assert type(AutoConfig.for_model('detris')) is DetrisConfig\nprint('registered')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "registered", run.stderr


def test_eval_results_json_of_detris_eval_is_accepted(tiny_model_dir, tmp_path, capsys):
    """The results.json `detris eval` writes (split -> metrics, fractions) goes straight into a card."""
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"val": {"mIoU": 0.5, "oIoU": 0.45, "Pr@50": 0.5, "Pr@60": 0.4, "Pr@70": 0.3,
                                           "Pr@80": 0.2, "Pr@90": 0.1, "num_samples": 12},
                                   "test": {"mIoU": 0.25, "oIoU": 0.2, "Pr@50": 0.2, "Pr@60": 0.1, "Pr@70": 0.0,
                                            "Pr@80": 0.0, "Pr@90": 0.0, "num_samples": 8}}))
    assert cli(["card", "--model", str(tiny_model_dir), "--eval-results", str(results)]) == 2
    assert "names no dataset; pass --eval-dataset" in capsys.readouterr().err
    readme = tmp_path / "README.md"
    assert cli(["card", "--model", str(tiny_model_dir), "--eval-results", str(results), "--eval-dataset", "refcoco",
                "--output", str(readme)]) == 0
    card = ModelCard.load(readme)
    found = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert found[("val", "mIoU")] == 50.0 and found[("test", "oIoU")] == 20.0 and len(found) == 14
    assert all(r.dataset_name == "RefCOCO (UNC)" for r in card.data.eval_results)


def test_adapter_card_refuses_a_local_base_path(tmp_path, capsys):
    """An adapter saved against a local base folder: the card (and the export) would publish that path."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "DETRIS", "base_model_name_or_path": str(tmp_path / "base")}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert cli(["card", "--model", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert "a local path, not a Hub id" in err and "--base-model ORG/NAME" in err
    assert cli(["export", "--model", str(adapter), "--output", str(tmp_path / "hub")]) == 2
    assert "a local path, not a Hub id" in capsys.readouterr().err and not (tmp_path / "hub").exists()
