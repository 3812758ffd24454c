"""DetrisProcessor: pairing, outputs, bad input, save/load and Auto classes."""

import json
import os
import subprocess
import sys
import textwrap
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


def run_fresh(code: str, cwd, pythonpath: str, tmp_path) -> subprocess.CompletedProcess:
    """`code` in a new interpreter: only what it imports is registered."""
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


USE_PROCESSOR = """
    import numpy as np
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(FOLDER{trust})
    out = processor(images=np.zeros((30, 40, 3), np.uint8), text=["the dog", "a cat"], return_tensors="pt")
    print(type(processor).__name__, type(processor.image_processor).__name__, type(processor.tokenizer).__name__,
          tuple(out["pixel_values"].shape), out["input_ids"][0].tolist())
"""


def test_a_saved_folder_gives_the_detris_processor_in_a_fresh_process(tmp_path):
    """The documented import line, or no import of ours at all with `trust_remote_code=True` (the folder carries its
    processing files and `auto_map`): either way `AutoProcessor` gives a working DetrisProcessor."""
    folder = tmp_path / "model"
    save_processor(folder, word_len=17)
    DetrisConfig().save_pretrained(folder)
    assert {"processing_detris.py", "image_processing_detris.py", "tokenization_detris.py"} <= {p.name for p in folder.iterdir()}
    expected_ids = DetrisProcessor()(text=["the dog"])["input_ids"][0].tolist()
    repo = str(Path(__file__).resolve().parents[1])
    expected = f"DetrisProcessor DetrisImageProcessor DetrisTokenizer (2, 3, 448, 448) {expected_ids}"

    documented = run_fresh("import modeling_detris, processing_detris\nFOLDER = %r\n" % str(folder)
                           + textwrap.dedent(USE_PROCESSOR.format(trust="")), repo, repo, tmp_path)
    assert documented.returncode == 0, documented.stderr[-2000:]
    assert documented.stdout.strip() == expected

    # Neither package importable (another folder, empty PYTHONPATH): the folder's own code is used.
    remote = run_fresh("FOLDER = %r\n" % str(folder) + textwrap.dedent(USE_PROCESSOR.format(trust=", trust_remote_code=True")),
                       tmp_path, "", tmp_path)
    assert remote.returncode == 0, remote.stderr[-2000:]
    assert remote.stdout.strip() == expected

    # Only the model registered: a clear request for trust_remote_code, never a plain tokenizer that ignores images.
    partial = run_fresh("import modeling_detris\nFOLDER = %r\n" % str(folder) + textwrap.dedent(USE_PROCESSOR.format(trust="")),
                        repo, repo, tmp_path)
    assert partial.returncode != 0 and "trust_remote_code=True" in partial.stderr
