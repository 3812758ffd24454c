"""DetrisProcessor: pairing, outputs, bad input, save/load and Auto classes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from configuration_detris import DetrisConfig
from processing_detris import DetrisImageProcessor, DetrisProcessor, DetrisTokenizer, save_processor


FIXTURES = Path(__file__).parent / "fixtures" / "processing"
TOKENS = json.loads((FIXTURES / "tokenizer_golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def processor():
    return DetrisProcessor(word_len=17)


@pytest.fixture(scope="module")
def image():
    return Image.open(FIXTURES / "image_6.png")


def test_one_image_several_expressions(processor, image):
    texts = TOKENS["sentences"][:3]
    out = processor(images=image, text=texts, masks=np.ones((37, 53), bool))
    assert out["pixel_values"].shape == (3, 3, 448, 448) and out["pixel_values"].dtype == torch.float32
    assert out["input_ids"].shape == (3, 17) and out["input_ids"].dtype == torch.int64
    assert out["input_ids"].tolist() == TOKENS["input_ids"]["17"][:3]
    assert out["labels"].shape == (3, 448, 448)
    assert out["original_sizes"].tolist() == [[37, 53]] * 3
    assert out["inverse_affines"].shape == (3, 2, 3)
    assert torch.equal(out["pixel_values"][0], out["pixel_values"][2])
    assert "attention_mask" not in out


def test_batch_of_pairs(processor, image):
    other = np.zeros((20, 30, 3), np.uint8)
    out = processor(images=[image, other], text=["left dog", "the big one!"], return_tensors="np")
    assert out["pixel_values"].shape == (2, 3, 448, 448) and isinstance(out["pixel_values"], np.ndarray)
    assert out["original_sizes"].tolist() == [[37, 53], [20, 30]]
    assert out["input_ids"][1].tolist() == TOKENS["input_ids"]["17"][16]


def test_text_only_and_image_only(processor, image):
    text_only = processor(text="the man on the left")
    assert set(text_only.keys()) == {"input_ids"}
    assert text_only["input_ids"].tolist() == [TOKENS["input_ids"]["17"][0]]
    image_only = processor(images=image)
    assert set(image_only.keys()) == {"pixel_values", "original_sizes", "inverse_affines"}
    empty = processor(text="")
    assert empty["input_ids"].tolist() == [[49406, 49407] + [0] * 15]  # documented: valid, like the official


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(), ValueError, "neither"),
        (dict(text=[]), ValueError, "empty list"),
        (dict(text=["ok", 3]), TypeError, r"text\[1\]. must be a str, got int"),
        (dict(text=None, images=None, masks=np.ones((2, 2))), ValueError, "neither|need their"),
        (dict(text=42), TypeError, "must be a str or a list"),
        (dict(images=[np.zeros((4, 4, 3), np.uint8)] * 2, text=["a", "b", "c"]), ValueError, "2 images and 3"),
        (dict(images=[np.zeros((4, 4, 3), np.uint8)] * 2, text="a"), ValueError, "2 images and 1"),
        (dict(images=[], text=["a"]), ValueError, "empty list"),
        (dict(images=np.zeros((0, 4, 3), np.uint8), text="a"), ValueError, "zero-size"),
        (dict(images=b"garbage", text="a"), ValueError, "corrupt"),
    ],
)
def test_bad_input_raises_clear_errors(processor, kwargs, error, message):
    with pytest.raises(error, match=message):
        processor(**kwargs)


def test_word_len_is_validated():
    with pytest.raises(ValueError, match="word_len must be an integer >= 2"):
        DetrisProcessor(word_len=1)


def test_post_processing_is_exposed(processor):
    logits = torch.zeros(2, 1, 128, 128)
    masks = processor.post_process_referring_segmentation(logits, torch.tensor([[5, 7], [9, 3]]))
    assert [tuple(m.shape) for m in masks] == [(5, 7), (9, 3)]


def test_save_pretrained_round_trip_and_auto_classes(tmp_path, image):
    saved = save_processor(tmp_path, word_len=22)
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["word_len"] == 22 and config["image_processor"]["image_processor_type"] == "DetrisImageProcessor"
    DetrisConfig(word_len=22).save_pretrained(tmp_path)  # the converter writes both into one folder

    for loaded in (DetrisProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, DetrisProcessor) and loaded.word_len == 22
        assert isinstance(loaded.image_processor, DetrisImageProcessor)
        assert isinstance(loaded.tokenizer, DetrisTokenizer) and loaded.tokenizer.pad_token_id == 0
        a = saved(images=image, text=TOKENS["sentences"])
        b = loaded(images=image, text=TOKENS["sentences"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert b["input_ids"].tolist() == TOKENS["input_ids"]["22"]
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), DetrisImageProcessor)
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path), DetrisTokenizer)
