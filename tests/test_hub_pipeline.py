"""The `referring-image-segmentation` pipeline and `detris predict` on a tiny model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from hub_helpers import save_tiny_model, write_test_image

import hub_card  # noqa: F401  (registers the task)
from processing_detris import overlay_colour, to_rgb_uint8
from training.cli import main as cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    model_dir = save_tiny_model(root / "model")
    image = write_test_image(root / "photo.png")
    return model_dir, image, pipeline("referring-image-segmentation", model=str(model_dir))


def test_pipeline_returns_one_mask_per_expression(setup):
    from modeling_detris import DetrisForReferringSegmentation
    from processing_detris import DetrisProcessor

    model_dir, image, pipe = setup
    single = pipe(str(image), "the red box")
    assert set(single) == {"text", "score", "mask", "mask_image"} and single["text"] == "the red box"
    assert single["mask"].dtype == bool and single["mask"].shape == (61, 83)
    assert single["mask_image"].mode == "L" and single["mask_image"].size == (83, 61)
    assert np.array_equal(np.asarray(single["mask_image"]) > 0, single["mask"])
    several = pipe(Image.open(image), ["the red box", "the noise"], threshold=0.5)
    assert [r["text"] for r in several] == ["the red box", "the noise"]
    # Same as the model + processor by hand (batch of both expressions, official post-processing).
    model = DetrisForReferringSegmentation.from_pretrained(str(model_dir)).eval()
    processor = DetrisProcessor.from_pretrained(str(model_dir))
    inputs = processor(images=str(image), text=["the red box", "the noise"], return_tensors="pt")
    with torch.inference_mode():
        logits = model(**inputs).logits
    masks = processor.post_process_referring_segmentation(logits, inputs["original_sizes"], threshold=0.5)
    for result, mask, probs in zip(several, masks, torch.sigmoid(logits[:, 0])):
        assert np.array_equal(result["mask"], mask.numpy())
        above = probs[probs > 0.5]
        assert result["score"] == pytest.approx(float(above.mean()) if above.numel() else 0.0, abs=1e-6)
    per_image = pipe([str(image), str(image)], "the red box")
    assert len(per_image) == 2 and np.array_equal(per_image[0]["mask"], single["mask"])


@pytest.mark.parametrize(
    "image, text, message",
    [
        ("missing.png", "the dog", "does not exist"),
        (None, "the dog", "An image is required"),
        ("IMAGE", "", "is empty"),
        ("IMAGE", ["the dog", "  "], "text\\[1\\]` is empty"),
        ("IMAGE", [], "non-empty"),
        ("IMAGE", None, "A referring expression is required"),
    ],
)
def test_pipeline_input_errors(setup, tmp_path, image, text, message):
    _, real_image, pipe = setup
    image = str(real_image) if image == "IMAGE" else (str(tmp_path / image) if image else None)
    with pytest.raises(ValueError, match=message):
        pipe(image, text)
    with pytest.raises(ValueError, match="threshold must be a probability"):
        pipe(str(real_image), "x", threshold=1.5)


def test_predict_writes_overlays_masks_and_a_summary(setup, tmp_path, capsys):
    model_dir, image, _ = setup
    second = write_test_image(tmp_path / "second.jpg", width=40, height=70, seed=2)
    out = tmp_path / "out"
    assert cli(["predict", "--model", str(model_dir), "--image", str(image), str(second),
                "--text", "the red box", "--text", "the noise", "--output", str(out)]) == 0
    expected = {f"{stem}_{k:02d}_{kind}.png" for stem in ("photo", "second") for k in (0, 1) for kind in ("mask", "overlay")}
    assert {p.name for p in out.iterdir()} == expected | {"predictions.json"}
    records = json.loads((out / "predictions.json").read_text())
    assert [(r["text"], r["mask"]) for r in records][:2] == [("the red box", "photo_00_mask.png"), ("the noise", "photo_01_mask.png")]
    mask = Image.open(out / "second_01_mask.png")
    overlay = Image.open(out / "second_01_overlay.png")
    assert mask.mode == "L" and mask.size == (40, 70) and set(np.unique(np.asarray(mask))) <= {0, 255}
    # A 40 px wide image is drawn 256 px wide (448 high), with the caption in a legend below it.
    assert overlay.mode == "RGB" and overlay.width == 256 and overlay.height > 448
    assert records[3]["mask_pixels"] == int((np.asarray(mask) > 0).sum())
    # Nothing covers the image (no banner): outside the mask every pixel is the original, scaled up.
    drawn = np.asarray(overlay)[:448]
    original = np.asarray(Image.fromarray(to_rgb_uint8(str(second))).resize((256, 448), Image.Resampling.NEAREST))
    outside = ~(np.asarray(mask.resize((256, 448), Image.Resampling.NEAREST)) > 127)
    assert (drawn[outside] == original[outside]).all()
    legend = np.asarray(overlay)[448:]
    assert (legend == overlay_colour(0)).all(axis=-1).any() and (legend.sum(axis=-1) < 100).any()  # swatch and text


def test_predict_refuses_a_non_image_in_one_line_naming_it(setup, tmp_path, capsys):
    model_dir, _, _ = setup
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    assert cli(["predict", "--model", str(model_dir), "--image", str(notes), "--text", "x", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "notes.png' is corrupt or not an image" in err and "Traceback" not in err


def test_predict_errors(setup, tmp_path, capsys):
    model_dir, image, _ = setup
    assert cli(["predict", "--model", str(model_dir), "--image", str(tmp_path / "nope.png"), "--text", "x",
                "--output", str(tmp_path / "o")]) == 2
    assert "nope.png' does not exist" in capsys.readouterr().err
    assert cli(["predict", "--model", str(model_dir), "--image", str(image), "--text", " ", "--output", str(tmp_path / "o")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert cli(["predict", "--model", str(tmp_path / "none"), "--image", str(image), "--text", "x", "--output", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
