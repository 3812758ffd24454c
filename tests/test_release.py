"""The official release as Hugging Face assets: `detris convert` with the text length of each dataset, a release split
into one base + one PEFT adapter per checkpoint (refused when the frozen tensors differ), backbone provenance,
adapter sizes, adapter cards with the authors' numbers beside ours, and `detris push` of base and adapters."""

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from safetensors import safe_open
from transformers import AutoModel, AutoProcessor, CLIPTextModelWithProjection, Dinov2WithRegistersModel

from modeling_detris import DetrisForReferringSegmentation
from modeling_detris.peft_detris import is_adapter_key
from official_standins import make_official_checkpoint, write_config
from training.cli import main as cli

import hub_card  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

EXPRESSIONS = ["the man on the left", "a dog lying in the grass next to the bench on the right side"]


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    official = root / "official"
    return SimpleNamespace(
        root=root,
        config=write_config(root / "tiny.json"),
        refcoco=make_official_checkpoint(official / "base_refcoco.pth", seed=1),
        umd=make_official_checkpoint(official / "base_refcocog_u.pth", seed=2),
    )


@pytest.fixture(scope="module")
def whole(standins):
    """Each stand-in converted whole (the reference for the split)."""
    out = {}
    for name, checkpoint in (("refcoco", standins.refcoco), ("umd", standins.umd)):
        out[name] = standins.root / f"whole-{name}"
        assert cli(["convert", "--checkpoint", str(checkpoint), "--config", str(standins.config), "--output", str(out[name])]) == 0
    return out


@pytest.fixture(scope="module")
def release(standins):
    output = standins.root / "release"
    assert cli(["convert", "--checkpoint", str(standins.refcoco), "--checkpoint", str(standins.umd), "--config",
                str(standins.config), "--split-adapters", "--output", str(output)]) == 0
    return output


def _image(seed=0):
    import numpy as np

    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (50, 70, 3), dtype=np.uint8))


def _inputs(folder):
    processor = AutoProcessor.from_pretrained(str(folder))
    return processor(images=_image(), text=EXPRESSIONS, return_tensors="pt")


@torch.no_grad()
def _logits(model, inputs):
    return model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"]).logits


# ----- 1. the text length -------------------------------------------------------------------------------------------
def test_umd_converts_with_word_len_22_and_refcoco_with_17_in_config_and_processor(whole, standins, tmp_path, capsys):
    for name, expected in (("refcoco", 17), ("umd", 22)):
        folder = whole[name]
        assert json.loads((folder / "config.json").read_text())["word_len"] == expected
        assert json.loads((folder / "processor_config.json").read_text())["word_len"] == expected
        processor = AutoProcessor.from_pretrained(str(folder))
        assert processor.word_len == expected
        assert processor(text=EXPRESSIONS, return_tensors="pt")["input_ids"].shape == (2, expected)
        assert AutoModel.from_pretrained(str(folder)).config.word_len == expected
        record = json.loads((folder / "conversion.json").read_text())
        assert record["word_len"] == expected and "from the file name" in record["word_len_origin"]
    # A file name that names no dataset: --dataset tells, else the --config file's own word_len (7) is kept.
    renamed = tmp_path / "weights.pth"
    shutil.copy(standins.refcoco, renamed)
    capsys.readouterr()
    for extra, expected, origin in ((["--dataset", "refcocog_u"], 22, "word_len 22 (dataset refcocog-umd)"),
                                    ([], 7, "word_len 7 (from --config)")):
        out = tmp_path / f"out-{expected}"
        assert cli(["convert", "--checkpoint", str(renamed), "--config", str(standins.config), *extra, "--output", str(out)]) == 0
        assert origin in capsys.readouterr().err
        assert json.loads((out / "processor_config.json").read_text())["word_len"] == expected
        assert json.loads((out / "config.json").read_text())["word_len"] == expected


# ----- 2. split into base + adapters ----------------------------------------------------------------------------------
def test_each_adapter_on_the_shared_base_reproduces_its_whole_conversion(release, whole):
    from peft import PeftModel

    assert sorted(p.name for p in release.iterdir()) == ["base", "refcoco", "refcocog-umd"]
    base = AutoModel.from_pretrained(str(release / "base")).eval()
    assert not base.config.adapters_in_model
    model = PeftModel.from_pretrained(base, str(release / "refcoco"), adapter_name="refcoco").eval()
    model.load_adapter(str(release / "refcocog-umd"), adapter_name="refcocog-umd")
    for adapter, reference in (("refcoco", whole["refcoco"]), ("refcocog-umd", whole["umd"]), ("refcoco", whole["refcoco"])):
        model.set_adapter(adapter)  # one loaded backbone, switched between datasets
        inputs = _inputs(release / adapter)  # the adapter's own processor: 17 or 22 tokens
        assert inputs["input_ids"].shape[1] == (22 if adapter == "refcocog-umd" else 17)
        expected = _logits(AutoModel.from_pretrained(str(reference)).eval(), inputs)
        assert torch.equal(_logits(model, inputs), expected), adapter
    # The model class on the adapter folder loads the base it names (../base, beside the adapter), then the adapter.
    umd = DetrisForReferringSegmentation.from_pretrained(str(release / "refcocog-umd")).eval()
    inputs = _inputs(release / "refcocog-umd")
    assert torch.equal(_logits(umd, inputs), _logits(AutoModel.from_pretrained(str(whole["umd"])).eval(), inputs))
    # With the adapters disabled the base expects its own text length again.
    with model.disable_adapter():
        with pytest.raises(ValueError, match=r"word_len=17"):
            _logits(model, inputs)


def test_a_moved_release_loads_each_documented_way_with_identical_logits(standins, whole, tmp_path, monkeypatch):
    from peft import PeftModel

    from training.parts import load_init_model
    from training_helpers import tiny_recipe

    built = tmp_path / "built" / "release"
    assert cli(["convert", "--checkpoint", str(standins.refcoco), "--checkpoint", str(standins.umd), "--config",
                str(standins.config), "--split-adapters", "--output", str(built)]) == 0
    moved = tmp_path / "elsewhere" / "deeper" / "detris-release"
    moved.parent.mkdir(parents=True)
    built.rename(moved)  # the folder it was written to no longer exists
    assert not built.exists()
    monkeypatch.chdir(tmp_path)  # a current directory where ../base is nothing
    for folder, reference in (("refcoco", whole["refcoco"]), ("refcocog-umd", whole["umd"])):
        adapter = moved / folder
        inputs = _inputs(adapter)
        expected = _logits(AutoModel.from_pretrained(str(reference)).eval(), inputs)
        loaded = {
            "model class": DetrisForReferringSegmentation.from_pretrained(str(adapter)),
            "peft": PeftModel.from_pretrained(AutoModel.from_pretrained(str(moved / "base")), str(adapter)),
            "init-from": load_init_model(tiny_recipe(tmp_path / "run", init_from=str(adapter), model_config={})),
        }
        for route, model in loaded.items():
            assert torch.equal(_logits(model.eval(), inputs), expected), (folder, route)
    # detris predict and detris eval on the moved adapter folder: the same outputs as on its checkpoint converted whole.
    _image().save(tmp_path / "photo.png")
    assert cli(["data", "refshapes", "--output", str(tmp_path / "data"), "--image-size", "64", "--n-train", "2",
                "--n-validation", "2", "--n-test", "3", "--no-progress"]) == 0
    outputs = {}
    for name, folder in (("adapter", moved / "refcoco"), ("whole", whole["refcoco"])):
        assert cli(["predict", "--model", str(folder), "--image", str(tmp_path / "photo.png"), "--text", EXPRESSIONS[0],
                    "--output", str(tmp_path / f"predict-{name}")]) == 0
        assert cli(["eval", "--model", str(folder), "--dataset", str(tmp_path / "data"), "--splits", "test",
                    "--grid", "0", "--output", str(tmp_path / f"eval-{name}")]) == 0
        outputs[name] = (json.loads((tmp_path / f"eval-{name}" / "results.json").read_text()),
                         sorted((p.name, p.read_bytes()) for p in (tmp_path / f"predict-{name}").iterdir() if p.suffix == ".png"))
    assert outputs["adapter"][0]["test"] == outputs["whole"][0]["test"]
    assert outputs["adapter"][1] == outputs["whole"][1] and outputs["adapter"][1]
    # A copy loads its own base, not the original's.
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    shutil.rmtree(moved / "base")
    assert torch.equal(_logits(DetrisForReferringSegmentation.from_pretrained(str(copy / "refcoco")).eval(), inputs := _inputs(copy / "refcoco")),
                       _logits(AutoModel.from_pretrained(str(whole["refcoco"])).eval(), inputs))
    # An adapter separated from its base says where it looked.
    with pytest.raises(OSError, match=r"names its base model '\.\./base' relative to itself, but .*holds no config.json"):
        DetrisForReferringSegmentation.from_pretrained(str(moved / "refcoco"))


def test_converting_several_checkpoints_shows_progress_and_no_warnings(standins, tmp_path, capsys):
    import warnings

    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli(["convert", "--checkpoint", str(standins.refcoco), "--checkpoint", str(standins.umd), "--config",
                    str(standins.config), "--split-adapters", "--output", str(tmp_path / "release")]) == 0
    assert [str(w.message) for w in caught] == []  # e.g. no FutureWarning about is_gradient_checkpointing
    err = capsys.readouterr().err
    assert "checkpoints: 100%" in err and "2/2" in err
    assert "adapter refcoco/" in err and "adapter refcocog-umd/" in err


def test_adapter_folders_hold_only_adapters_and_head(release):
    base_config = json.loads((release / "base" / "config.json").read_text())
    with safe_open(str(release / "base" / "model.safetensors"), "pt") as handle:
        base_keys = set(handle.keys())
    assert not any(is_adapter_key(k) for k in base_keys)
    for folder, word_len, dataset in (("refcoco", 17, "refcoco"), ("refcocog-umd", 22, "refcocog-umd")):
        adapter_config = json.loads((release / folder / "adapter_config.json").read_text())
        assert adapter_config["peft_type"] == "DETRIS" and adapter_config["word_len"] == word_len
        assert adapter_config["base_model_name_or_path"] == "../base"  # relative: the release can be moved
        with safe_open(str(release / folder / "adapter_model.safetensors"), "pt") as handle:
            keys = {k.removeprefix("base_model.model.") for k in handle.keys()}
        assert keys and all(is_adapter_key(k) or k.startswith(("neck.", "decoder.", "projector.")) for k in keys)
        assert not any(k.startswith(("vision_model.", "text_model.")) and not is_adapter_key(k) for k in keys)
        record = json.loads((release / folder / "conversion.json").read_text())
        assert record["dataset"] == dataset and record["kind"] == "adapter"
        assert json.loads((release / folder / "processor_config.json").read_text())["word_len"] == word_len
        assert not (release / folder / "README.md").exists()  # PEFT's stub is not left as our card
    assert base_config["word_len"] == 17  # the first checkpoint's; each adapter records its own


def _bump(tensor: torch.Tensor) -> torch.Tensor:
    """The same tensor with its first element moved to the next representable float: one bit."""
    changed = tensor.clone()
    flat = changed.view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=flat.dtype))
    return changed


def test_checkpoints_whose_frozen_tensors_differ_are_refused_with_the_names(standins, tmp_path, capsys):
    checkpoint = torch.load(standins.refcoco, weights_only=True)
    state = checkpoint["state_dict"]
    state["module.dinov2.norm.weight"] = _bump(state["module.dinov2.norm.weight"])
    state["module.txt_backbone.transformer.resblocks.2.mlp.c_fc.bias"] = _bump(state["module.txt_backbone.transformer.resblocks.2.mlp.c_fc.bias"])
    torch.save(checkpoint, tmp_path / "base_refcoco+.pth")
    output = tmp_path / "release"
    # a user mistake: one line on stderr, exit code 2
    assert cli(["convert", "--checkpoint", str(standins.refcoco), "--checkpoint", str(tmp_path / "base_refcoco+.pth"),
                "--config", str(standins.config), "--split-adapters", "--output", str(output)]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("detris convert: error: ")
    assert "base_refcoco+.pth does not share its frozen backbones with base_refcoco.pth: 2 tensor(s) differ" in message
    assert "dinov2.norm.weight" in message and "txt_backbone.transformer.resblocks.2.mlp.c_fc.bias" in message
    assert not output.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".release")]  # no staging

    # A checkpoint of another backbone: every frozen tensor differs, and the list names them.
    other = make_official_checkpoint(tmp_path / "other" / "base_refcoco+.pth", seed=3, backbone_seed=5)
    assert cli(["convert", "--checkpoint", str(standins.refcoco), "--checkpoint", str(other), "--config",
                str(standins.config), "--split-adapters", "--output", str(output)]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "dinov2.blocks.0.attn.qkv.weight" in message
    assert "tensor(s) differ bit for bit" in message and not output.exists()


def test_convert_argument_errors_name_the_values(standins, tmp_path, capsys):
    both = ["--checkpoint", str(standins.refcoco), "--checkpoint", str(standins.umd), "--config", str(standins.config)]
    for argv, message in (
        ([*both, "--output", str(tmp_path / "a")], "2 --checkpoint files given without --split-adapters"),
        ([*both, "--split-adapters", "--dataset", "refcoco", "--output", str(tmp_path / "b")],
         "--dataset was given 1 time(s) for 2 --checkpoint"),
        ([*both, "--split-adapters", "--dataset", "refcoco", "--dataset", "refcoco", "--output", str(tmp_path / "c")],
         "would both become the adapter folder 'refcoco'"),
        (["--checkpoint", str(standins.refcoco), "--dataset", "coco", "--output", str(tmp_path / "d")], "unknown dataset 'coco'"),
    ):
        assert cli(["convert", *argv]) == 2  # a user mistake: one line on stderr, exit code 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and err[-1].startswith("detris convert: error: "), err
    assert not any(tmp_path.iterdir())


# ----- 3. provenance --------------------------------------------------------------------------------------------------
def test_base_records_where_its_backbones_come_from(release, standins, whole):
    from modeling_detris.provenance import backbone_tensors, fingerprint

    record = json.loads((release / "base" / "backbone_provenance.json").read_text())
    files = {c["file"]: c for c in record["checkpoints"]}
    for path in (standins.refcoco, standins.umd):
        assert files[path.name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert files[path.name]["bytes"] == path.stat().st_size
    tensors = backbone_tensors(AutoModel.from_pretrained(str(whole["umd"])))
    for role in ("vision", "text"):
        assert record[role]["sha256"] == fingerprint(tensors[role])
        assert record[role]["tensors"] == len(tensors[role])
        assert record[role]["equal_to_public"] == "no public counterpart of this shape"  # tiny backbones
    assert "detris provenance --base" in record["how_to_check"]


def test_provenance_check_against_public_folders(release, tmp_path, capsys):
    """`detris provenance` with local stand-ins of the public checkpoints: an exact copy, then one changed tensor."""
    base_dir = tmp_path / "base"
    shutil.copytree(release / "base", base_dir)
    model = AutoModel.from_pretrained(str(base_dir))

    def save_as_public(module, cls, sub_config, folder):  # the base keeps transformers' own DINOv2 / CLIP key names
        public = cls(sub_config)
        public.load_state_dict(module.state_dict(), strict=True)
        public.save_pretrained(folder)

    save_as_public(model.vision_model, Dinov2WithRegistersModel, model.config.vision_config, tmp_path / "dinov2")
    save_as_public(model.text_model, CLIPTextModelWithProjection, model.config.text_config, tmp_path / "clip")
    assert cli(["provenance", "--base", str(base_dir), "--vision", str(tmp_path / "dinov2"), "--text", str(tmp_path / "clip")]) == 0
    out = capsys.readouterr().out
    assert "vision: bit-identical" in out and "text: bit-identical" in out
    record = json.loads((base_dir / "backbone_provenance.json").read_text())
    assert record["vision"]["equal_to_public"] is True and record["text"]["comparison"]["reference"] == str(tmp_path / "clip")

    changed = model.vision_model.state_dict()["encoder.layer.2.mlp.fc1.weight"]
    with torch.no_grad():
        changed.add_(1e-3)
    save_as_public(model.vision_model, Dinov2WithRegistersModel, model.config.vision_config, tmp_path / "dinov2-changed")
    assert cli(["provenance", "--base", str(base_dir), "--vision", str(tmp_path / "dinov2-changed"), "--text", str(tmp_path / "clip")]) == 0
    assert "vision: DIFFERENT" in capsys.readouterr().out
    comparison = json.loads((base_dir / "backbone_provenance.json").read_text())["vision"]["comparison"]
    assert comparison["differing"] == ["encoder.layer.2.mlp.fc1.weight"] and comparison["equal"] is False
    assert comparison["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)


def test_fp16_rounded_weights_are_told_apart_from_different_ones():
    from modeling_detris.provenance import compare_tensors, fp16_representable

    generator = torch.Generator().manual_seed(0)
    ours = {"a": torch.randn(64, generator=generator).half().float(), "b": torch.randn(8, generator=generator).half().float()}
    assert fp16_representable(ours)
    # A public fp32 copy whose values round to ours in fp16 (below half an fp16 ulp away), and one that does not.
    public = {"a": ours["a"] * (1 + 2.0**-13), "b": ours["b"].clone()}
    result = compare_tensors(ours, public)
    assert result["identical"] == 1 and result["equal_after_rounding_the_public_weights_to_fp16"] == 2
    assert result["differing"] == [] and result["equal"] is False
    public["a"] = ours["a"] + 0.01
    assert compare_tensors(ours, public)["differing"] == ["a"]
    assert not fp16_representable({"x": torch.tensor([1.0 + 2.0**-20])})


# ----- 4. publishing ----------------------------------------------------------------------------------------------------
class UploadRecorder:
    """Replaces only HfApi's network methods; keeps a copy of every uploaded folder."""

    def __init__(self, monkeypatch, store: Path):
        self.uploads = {}
        recorder = self

        def create_repo(self, repo_id, **kwargs):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            copy = store / repo_id.replace("/", "__")
            shutil.copytree(folder_path, copy)
            recorder.uploads[repo_id] = copy
            return f"https://huggingface.co/{repo_id}/commit/0"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(HfApi, "whoami", lambda self, *args, **kwargs: {"name": "org-member"})


def test_push_base_and_adapters_with_cards(release, tmp_path, monkeypatch):
    recorder = UploadRecorder(monkeypatch, tmp_path)
    assert cli(["push", "--model", str(release / "base"), "--repo-id", "org/detris-tiny-base"]) == 0
    base = recorder.uploads["org/detris-tiny-base"]
    assert {"model.safetensors", "config.json", "backbone_provenance.json", "conversion.json", "README.md"} <= {
        p.name for p in base.iterdir()}
    base_card = ModelCard.load(base / "README.md")
    assert "frozen base of" in base_card.text and "Results reported by the authors" not in base_card.text

    for folder, word_len in (("refcoco", 17), ("refcocog-umd", 22)):
        repo = f"org/detris-tiny-{folder}"
        assert cli(["push", "--model", str(release / folder), "--repo-id", repo, "--base-model", "org/detris-tiny-base"]) == 0
        uploaded = recorder.uploads[repo]
        assert {p.name for p in uploaded.iterdir()} == {
            "adapter_config.json", "adapter_model.safetensors", "README.md", "conversion.json", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json"}
        # The Hub copy names the base by its Hub id, so AutoModel.from_pretrained(<adapter repo>) can find it.
        assert json.loads((uploaded / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/detris-tiny-base"
        assert json.loads((release / folder / "adapter_config.json").read_text())["base_model_name_or_path"] != "org/detris-tiny-base"
        assert json.loads((uploaded / "processor_config.json").read_text())["word_len"] == word_len
        card = ModelCard.load(uploaded / "README.md")
        assert card.data.base_model == "org/detris-tiny-base" and card.data.library_name == "peft"
        assert f'AutoProcessor.from_pretrained("{repo}")' in card.text  # the adapter's processor (its text length)
        assert f"`base_{'refcoco' if folder == 'refcoco' else 'refcocog_u'}.pth`" in card.text


# ----- DETRIS-B: sizes, and the authors' numbers beside ours ---------------------------------------------------------
@pytest.fixture(scope="module")
def base_release(official_base_checkpoint, tmp_path_factory):
    """The DETRIS-B stand-in (official layout, 703 MB) split into base + adapter."""
    output = tmp_path_factory.mktemp("base-release") / "release"
    assert cli(["convert", "--checkpoint", str(official_base_checkpoint), "--variant", "base", "--split-adapters",
                "--output", str(output)]) == 0
    return output


def test_detris_b_adapter_folder_is_under_a_sixth_of_the_whole_model(base_release, converted_base_dir):
    from modeling_detris.info import count_parameters, load_for_counting, release_sizes

    adapter_file = base_release / "refcoco" / "adapter_model.safetensors"
    whole_file = converted_base_dir / "model.safetensors"
    assert adapter_file.stat().st_size < whole_file.stat().st_size / 6
    counts = count_parameters(load_for_counting("base"))
    with safe_open(str(adapter_file), "pt") as handle:
        numel = {k: torch.Size(handle.get_slice(k).get_shape()).numel() for k in handle.keys()}
    parameters = sum(n for k, n in numel.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert parameters == counts.trainable == counts.adapters + counts.head == 25_518_129
    # The computed sizes (docs/release.md) match the real files up to their headers.
    sizes = release_sizes(load_for_counting("base"))
    assert 0 <= adapter_file.stat().st_size - sizes["adapter"]["bytes"] < 200_000
    assert 0 <= whole_file.stat().st_size - sizes["standalone"]["bytes"] < 200_000
    assert 0 <= (base_release / "base" / "model.safetensors").stat().st_size - sizes["base"]["bytes"] < 200_000


def test_docs_state_the_computed_sizes(capsys):
    assert cli(["info", "base", "--sizes"]) == 0
    table = capsys.readouterr().out.strip()
    docs = (Path(__file__).parent.parent / "docs" / "release.md").read_text()
    for line in table.splitlines():
        assert line.strip() in docs, line
    assert "| adapter folder: adapters + head (`--split-adapters`) | 25,518,129 | 10,340 | 102.1 MB | 51.1 MB |" in table


def test_adapter_card_has_the_reported_numbers_beside_ours(base_release, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"dataset": "refcoco", "results": {"val": {"mIoU": 0.7612, "oIoU": 0.7398, "num_samples": 10834},
                                                                   "testB": {"mIoU": 0.731}}}))
    readme = tmp_path / "README.md"
    assert cli(["card", "--model", str(base_release / "refcoco"), "--eval-results", str(results), "--repo-id",
                "org/detris-base-refcoco", "--base-model", "org/detris-base", "--output", str(readme)]) == 0
    card = ModelCard.load(readme)
    assert card.data.base_model == "org/detris-base" and "jxu124/refcoco" in card.data.datasets
    found = {(r.dataset_split, r.metric_type, "reported" in r.metric_name): r.metric_value for r in card.data.eval_results}
    assert found == {
        ("val", "mIoU", False): 76.12, ("val", "oIoU", False): 73.98, ("testB", "mIoU", False): 73.1,
        ("val", "mIoU", True): 76.0, ("val", "oIoU", True): 74.3, ("testB", "mIoU", True): 73.5, ("testB", "oIoU", True): 71.4,
    }
    assert all(r.dataset_name == "RefCOCO (UNC)" for r in card.data.eval_results)
    assert "trained on RefCOCO (UNC)" in card.text and "`base_refcoco.pth`" in card.text
    assert "DETRIS-B, as reported by the authors" in card.text


def test_adapter_word_len_is_validated_and_travels_to_a_standalone_model():
    from modeling_detris import DetrisAdapterConfig

    with pytest.raises(ValueError, match=r"word_len must be None or an integer >= 2 \(SOT \+ EOT\), got 1"):
        DetrisAdapterConfig(word_len=1)
    assert DetrisAdapterConfig(word_len=22).to_model_config_kwargs()["word_len"] == 22
    assert "word_len" not in DetrisAdapterConfig().to_model_config_kwargs()  # None: the base's own is kept
