"""draw_referring_overlay: the one renderer of predictions and ground truth, and its callers (evaluation grids)."""

import numpy as np
import pytest
import torch
from PIL import Image

from hub_helpers import save_tiny_model
from processing_detris import DetrisProcessor, draw_referring_overlay, overlay_colour


def scene(height=480, width=640, seed=0):
    image = np.random.default_rng(seed).integers(60, 200, (height, width, 3), dtype=np.uint8)
    prediction = np.zeros((height, width), bool)
    prediction[100:300, 50:300] = True
    truth = np.zeros((height, width), bool)
    truth[120:330, 80:330] = True
    return image, prediction, truth


def colour_pixels(picture: Image.Image, colour, rows=None) -> int:
    array = np.asarray(picture)[:rows]
    return int((array == np.asarray(colour)).all(axis=-1).sum())


def test_ground_truth_outline_survives_shrinking_to_a_grid_cell():
    image, prediction, truth = scene()
    picture = draw_referring_overlay(image, [prediction], ["the box"], ground_truth=truth, width=192)
    drawn_height = round(480 * 192 / 640)
    assert picture.width == 192 and picture.height > drawn_height  # legend below
    black = colour_pixels(picture, (0, 0, 0), drawn_height)
    # the ground truth's dashes (colour / black) run along all four sides, thick enough to see at 192 px
    assert black > 100
    dark_rows = np.nonzero((np.asarray(picture)[:drawn_height] == 0).all(axis=-1).any(axis=1))[0]
    assert dark_rows.min() <= 120 * 192 / 640 + 3 and dark_rows.max() >= 330 * 192 / 640 - 3
    assert colour_pixels(picture, overlay_colour(0), drawn_height) > 100  # the prediction's outline


def test_captions_are_never_cut_and_nothing_covers_the_image():
    image, prediction, _ = scene(128, 128)
    short = draw_referring_overlay(image, [prediction[:128, :128]], ["dog"], scores=[0.123456])
    long_text = "the second dog from the left behind the red car next to the tall lamp post " * 3
    long = draw_referring_overlay(image, [prediction[:128, :128]], [long_text], scores=[0.5])
    assert short.width == long.width == 256  # a 128 px image is scaled up to stay readable
    assert long.height > short.height + 40  # the caption wraps onto more lines instead of being cut
    # outside the mask the drawn image is the original, scaled up: no banner over it
    upscaled = np.asarray(Image.fromarray(image).resize((256, 256), Image.Resampling.NEAREST))
    outside = ~np.asarray(Image.fromarray(prediction[:128, :128]).resize((256, 256), Image.Resampling.NEAREST))
    assert (np.asarray(short)[:256][outside] == upscaled[outside]).all()


def test_one_colour_per_expression_and_clear_errors():
    image, prediction, truth = scene(60, 80)
    masks = torch.stack([torch.from_numpy(prediction), torch.from_numpy(truth)])
    picture = draw_referring_overlay(image, masks, ["a", "b"], width=160)
    assert overlay_colour(0) != overlay_colour(1)
    for index in (0, 1):
        assert colour_pixels(picture, overlay_colour(index)) > 0
    assert DetrisProcessor.draw_referring_overlay(image, masks, ["a", "b"], width=160).tobytes() == picture.tobytes()
    with pytest.raises(ValueError, match="2 masks but 1 labels"):
        draw_referring_overlay(image, masks, ["a"])
    with pytest.raises(ValueError, match=r"masks\[0\] has shape \(10, 10\)"):
        draw_referring_overlay(image, [np.zeros((10, 10), bool)], ["a"])


@torch.inference_mode()
def test_evaluation_grid_shows_ground_truth_and_full_captions(tmp_path):
    from datasets import Dataset

    from modeling_detris import DetrisForReferringSegmentation
    from training.data.masks import binary_mask_to_rle
    from training.evaluation import build_arg_parser, prediction_grid

    folder = save_tiny_model(tmp_path / "model")
    model = DetrisForReferringSegmentation.from_pretrained(folder).eval()
    processor = DetrisProcessor.from_pretrained(folder)
    image, _, truth = scene()
    sentence = "the big grey rectangle in the middle of the noisy picture on the left side"
    Image.fromarray(image).save(tmp_path / "photo.png")
    rows = Dataset.from_list([{"image": str(tmp_path / "photo.png"), "sentence": sentence, "mask": binary_mask_to_rle(truth)}])
    path = prediction_grid(model, processor, rows, [0], torch.tensor([0.25]), tmp_path / "grid.png", title="best")
    grid = Image.open(path).convert("RGB")
    cell = grid.crop((0, 20, 192, 20 + 144))  # the 640x480 photo drawn 192 px wide under the 20 px title
    assert colour_pixels(cell, (0, 0, 0)) > 100  # ground truth dashes visible after shrinking
    assert grid.height > 20 + 144 + 3 * 14  # the 75-character caption and IoU wrap below, in full
    assert "N/2 best" in " ".join(build_arg_parser().format_help().split())
