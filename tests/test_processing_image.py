"""DetrisImageProcessor: official letterbox goldens, CLIP normalisation, OpenCV-like decoding, labels, limits."""

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from processing_detris import DEFAULT_MAX_IMAGE_PIXELS, DetrisImageProcessor, apply_affine_to_points, get_letterbox_affine
from processing_detris.image_processing_detris import to_rgb_uint8


FIXTURES = Path(__file__).parent / "fixtures" / "processing"
META = json.loads((FIXTURES / "letterbox_golden.json").read_text())
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).reshape(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).reshape(3, 1, 1)


def golden_letterbox(index):
    name = "image_5.png" if index == 5 else f"letterboxed_{index}.png"  # image 5 is 448x448: identity letterbox
    return np.asarray(Image.open(FIXTURES / name).convert("RGB"))


def official_normalisation(boxed_uint8):
    return torch.from_numpy(boxed_uint8.transpose(2, 0, 1).copy()).float().div(255.0).sub(CLIP_MEAN).div(CLIP_STD)


def cv2_decode(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def encode(image: Image.Image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def processor():
    return DetrisImageProcessor()


@pytest.mark.parametrize("entry", META, ids=lambda m: f"image_{m['index']}")
def test_letterbox_matches_golden(processor, entry):
    index = entry["index"]
    image = Image.open(FIXTURES / f"image_{index}.png")
    affine, inverse = get_letterbox_affine(entry["height"], entry["width"])
    np.testing.assert_allclose(affine, entry["affine"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(inverse, entry["inverse_affine"], rtol=0, atol=1e-9)

    rgb = to_rgb_uint8(image)
    border = tuple(255 * m for m in processor.image_mean)
    boxed = cv2.warpAffine(rgb, affine, (448, 448), flags=cv2.INTER_CUBIC, borderValue=border)
    golden = golden_letterbox(index)
    assert np.abs(boxed.astype(int) - golden).max() <= 1  # measured: 0 with opencv-python-headless 5.0

    out = processor(image, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 448, 448) and out["pixel_values"].dtype == torch.float32
    # pixel_values are exactly the official float32 normalisation of our letterbox ...
    torch.testing.assert_close(out["pixel_values"][0], official_normalisation(boxed), rtol=0, atol=0)
    # ... and within one grey level of the golden's normalisation
    assert (out["pixel_values"][0] - official_normalisation(golden)).abs().max() <= 1.0 / 255 / 0.26 + 1e-6
    assert out["original_sizes"].tolist() == [[entry["height"], entry["width"]]]
    np.testing.assert_allclose(out["inverse_affines"][0].numpy(), entry["inverse_affine"], atol=1e-9)


def test_border_normalises_to_about_zero(processor):
    out = processor(np.zeros((10, 100, 3), np.uint8), return_tensors="pt")["pixel_values"][0]
    assert out[:, 0, :].abs().max() < 0.01  # top rows are border (mean colour, rounded to uint8)


def test_input_types_agree(processor):
    rgb = np.random.default_rng(0).integers(0, 256, (29, 41, 3), dtype=np.uint8)
    reference = processor(rgb)["pixel_values"]
    for variant in (
        Image.fromarray(rgb),
        torch.from_numpy(rgb).permute(2, 0, 1),  # torch CHW
        rgb.transpose(2, 0, 1),  # numpy CHW (inferred)
        rgb.astype(np.float32) / 255.0,  # float in [0, 1]
        encode(Image.fromarray(rgb)),  # encoded bytes -> cv2.imdecode
    ):
        torch.testing.assert_close(processor(variant)["pixel_values"], reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["RGBA", "LA", "L", "P", "1", "I;16", "CMYK", "EXIF-PNG", "EXIF-JPEG", "RGB16"])
def test_decoding_matches_opencv(kind):
    """PIL inputs are converted the way cv2.imdecode(IMREAD_COLOR) + BGR->RGB decodes the same file."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (23, 31, 4), dtype=np.uint8)
    if kind == "RGBA":
        data = encode(Image.fromarray(base, "RGBA"))
    elif kind == "LA":
        data = encode(Image.fromarray(base[..., :2], "LA"))
    elif kind == "L":
        data = encode(Image.fromarray(base[..., 0]))
    elif kind == "P":
        data = encode(Image.fromarray(base[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE))
    elif kind == "1":
        data = encode(Image.fromarray(base[..., 0] > 127))
    elif kind == "I;16":
        data = encode(Image.fromarray(rng.integers(0, 65536, (23, 31)).astype(np.uint16)))
    elif kind == "CMYK":
        data = encode(Image.fromarray(base, "CMYK"), "JPEG", quality=95)
    elif kind.startswith("EXIF"):
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees
        fmt = "PNG" if kind == "EXIF-PNG" else "JPEG"
        data = encode(Image.fromarray(base[..., :3]), fmt, exif=exif.tobytes(), quality=95)
    else:  # 16-bit RGB PNG
        ok, buffer = cv2.imencode(".png", rng.integers(0, 65536, (23, 31, 3)).astype(np.uint16))
        data = buffer.tobytes()
    ours = to_rgb_uint8(Image.open(io.BytesIO(data)))
    official = cv2_decode(data)
    assert ours.shape == official.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, official)


def test_uint16_and_grey_arrays():
    grey16 = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)
    out = to_rgb_uint8(grey16)
    assert out.shape == (16, 16, 3) and np.array_equal(out[..., 0], (grey16 >> 8).astype(np.uint8))
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent: alpha is dropped, not composited on white
    assert to_rgb_uint8(rgba).max() == 0


def test_masks_become_soft_labels(processor):
    mask = np.zeros((37, 53), np.uint8)
    mask[10:20, 5:40] = 255
    out = processor(np.zeros((37, 53, 3), np.uint8), masks=mask, return_tensors="pt")
    labels = out["labels"]
    affine, _ = get_letterbox_affine(37, 53)
    expected = cv2.warpAffine(mask, affine, (448, 448), flags=cv2.INTER_LINEAR, borderValue=0) / np.float32(255)
    assert labels.shape == (1, 448, 448) and labels.dtype == torch.float32
    torch.testing.assert_close(labels[0], torch.from_numpy(expected.astype(np.float32)), rtol=0, atol=0)
    assert 0.0 <= labels.min() and labels.max() <= 1.0 and ((labels > 0) & (labels < 1)).any()
    # bool and 0/1 masks mean the same thing
    for variant in (mask > 0, (mask > 0).astype(np.uint8), torch.from_numpy(mask > 0)):
        torch.testing.assert_close(processor(np.zeros((37, 53, 3), np.uint8), masks=variant, return_tensors="pt")["labels"], labels)


def test_mask_size_must_match_image(processor):
    with pytest.raises(ValueError, match=r"Mask 0 has shape \(10, 10\) but its image is \(37, 53\)"):
        processor(np.zeros((37, 53, 3), np.uint8), masks=np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="2 images but 1 masks"):
        processor([np.zeros((5, 5, 3), np.uint8)] * 2, masks=[np.zeros((5, 5), np.uint8)])


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((0, 10, 3), np.uint8), "zero-size"),
        (np.zeros((10, 0), np.uint8), "zero-size"),
        (torch.zeros(3, 0, 5), "zero-size"),
        (np.zeros((6, 6, 5), np.uint8), "channel axis"),
        (np.full((4, 4, 3), 2.0, np.float32), r"\[0, 1\]"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.full((4, 4), 300, np.int32), "0..255"),
        (b"", "empty byte string"),
        (b"not an image at all", "corrupt"),
        ("/nonexistent/file.png", "does not exist"),
        (12345, "Unsupported image type"),
    ],
)
def test_bad_images_raise_clear_errors(processor, bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        processor(bad)


def test_truncated_files_raise_clear_errors(processor):
    data = encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    truncated = data[: len(data) // 2]
    with pytest.raises(ValueError, match="corrupt|truncated"):
        processor(truncated)  # bytes: header fine, cv2.imdecode fails
    with pytest.raises(ValueError, match="corrupt|truncated"):
        processor(Image.open(io.BytesIO(truncated)))  # lazy PIL image: decoding fails


def test_pixel_limit_is_enforced_before_decoding():
    processor = DetrisImageProcessor()
    assert processor.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 8192 * 8192
    # exactly at the default limit works (np.zeros pages are only touched where the warp samples)
    out = processor(np.zeros((8192, 8192, 3), np.uint8))
    assert out["original_sizes"].tolist() == [[8192, 8192]]
    with pytest.raises(ValueError, match="max_image_pixels=67108864"):
        processor(np.zeros((8192, 8193, 3), np.uint8))
    # encoded bytes are refused from their header, before any pixel is decoded
    small = DetrisImageProcessor(max_image_pixels=100)
    with pytest.raises(ValueError, match="11 x 10 = 110 pixels"):
        small(encode(Image.new("RGB", (10, 11))))
    with pytest.raises(ValueError, match="max_image_pixels=100"):
        small(Image.new("RGB", (10, 11)))


SMALL_LIMIT = 20_000


@st.composite
def image_sizes(draw, limit):
    height = draw(st.integers(1, limit))
    width = draw(st.integers(1, limit // height))
    return height, width


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=image_sizes(DEFAULT_MAX_IMAGE_PIXELS))
def test_any_size_up_to_the_default_limit_works(size):
    height, width = size
    processor = DetrisImageProcessor()
    out = processor(np.zeros((height, width, 3), np.uint8), return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 448, 448)
    assert torch.isfinite(out["pixel_values"]).all()
    assert out["original_sizes"].tolist() == [[height, width]]


@settings(max_examples=40, deadline=None)
@given(size=image_sizes(SMALL_LIMIT), extra=st.integers(1, 1000))
def test_limit_boundary_with_a_configured_limit(size, extra):
    height, width = size
    processor = DetrisImageProcessor(max_image_pixels=SMALL_LIMIT)
    processor(np.zeros((height, width, 3), np.uint8))
    too_wide = SMALL_LIMIT // height + 1 + extra // height
    with pytest.raises(ValueError, match="decompression-bomb guard"):
        processor(np.zeros((height, too_wide, 3), np.uint8))


@settings(max_examples=200, deadline=None)
@given(size=image_sizes(DEFAULT_MAX_IMAGE_PIXELS), fx=st.floats(0, 1), fy=st.floats(0, 1))
def test_point_through_letterbox_and_back(size, fx, fy):
    """Matrix level: a point mapped with the letterbox matrix and back with the stored inverse lands within one
    pixel (in practice within 1e-3 px), and the image corners land on the centred content box."""
    height, width = size
    affine, inverse = get_letterbox_affine(height, width)
    point = np.array([[fx * (width - 1), fy * (height - 1)]])
    forward = apply_affine_to_points(affine, point)
    assert (forward >= -1e-3).all() and (forward <= 448 + 1e-3).all()
    back = apply_affine_to_points(inverse, forward)
    assert np.abs(back - point).max() <= 1.0
    corners = apply_affine_to_points(affine, [[0, 0], [width, height]])
    scale = min(448 / height, 448 / width)
    np.testing.assert_allclose(corners[1] - corners[0], [width * scale, height * scale], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(corners[0] + corners[1], [448, 448], atol=1e-3)  # centred


@settings(max_examples=60, deadline=None)
@given(
    size=st.tuples(st.integers(4, 1500), st.integers(4, 1500)),
    fx=st.floats(0.1, 0.9),
    fy=st.floats(0.1, 0.9),
)
def test_blob_through_letterbox_and_post_processing_lands_on_itself(size, fx, fy):
    """Raster level: a square blob in a mask goes through the label warp (linear) and back through the
    post-processing warp (cubic, torch path); its centroid lands within one pixel of the coarser of the two
    grids (max(1, 1/scale) original pixels) of where it started."""
    height, width = size
    processor = DetrisImageProcessor()
    scale = min(448 / height, 448 / width)
    half = max(2, int(np.ceil(3 / scale)))
    cx = int(round(fx * (width - 1)))
    cy = int(round(fy * (height - 1)))
    x0, x1 = max(0, cx - half), min(width, cx + half + 1)
    y0, y1 = max(0, cy - half), min(height, cy + half + 1)
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    labels = processor(np.zeros((height, width, 3), np.uint8), masks=mask, return_tensors="pt")["labels"]
    # feed the soft label back as "logits" whose sigmoid is the label: logit(p) (clamped)
    p = labels.clamp(1e-4, 1 - 1e-4)
    logits = torch.log(p / (1 - p))[:, None]
    back = processor.post_process_referring_segmentation(logits, [(height, width)], threshold=0.5)[0].numpy()
    assert back.any()
    ys, xs = np.nonzero(back)
    tolerance = max(1.0, 1.0 / scale)
    assert abs(xs.mean() - (x0 + x1 - 1) / 2) <= tolerance
    assert abs(ys.mean() - (y0 + y1 - 1) / 2) <= tolerance


def same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_do_convert_rgb_false_is_honoured():
    """RGB inputs give the same pixels; anything that would need a colour conversion is refused, naming the option."""
    rgb = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    plain = DetrisImageProcessor(do_convert_rgb=False)
    assert same(plain(rgb)["pixel_values"], DetrisImageProcessor()(rgb)["pixel_values"])
    assert same(plain(Image.fromarray(rgb))["pixel_values"], plain(encode(Image.fromarray(rgb)))["pixel_values"])
    for bad in (rgb[..., 0], np.dstack([rgb, rgb[..., :1]]), Image.fromarray(rgb).convert("L"),
                encode(Image.fromarray(rgb).convert("RGBA")), Image.fromarray(rgb).convert("CMYK")):
        with pytest.raises(ValueError, match="do_convert_rgb=False"):
            plain(bad)
    assert DetrisImageProcessor()(rgb[..., 0])["pixel_values"].shape == (1, 3, 448, 448)  # default: converted
    with pytest.raises(ValueError, match="do_convert_rgb=False"):
        DetrisImageProcessor()(rgb[..., 0], do_convert_rgb=False)  # as a call option too


@pytest.mark.parametrize(
    "option, message",
    [
        ({"image_mean": [0.5, 0.5, 0.5, 0.5]}, r"image_mean=.0.5, 0.5, 0.5, 0.5. must be 3 finite numbers"),
        ({"image_mean": [0.5, float("nan"), 0.5]}, "image_mean=.* must be 3 finite numbers"),
        ({"image_std": [0.2, 0.0, 0.2]}, r"image_std=.* must be > 0"),
        ({"image_std": [0.2, -1.0, 0.2]}, r"image_std=.* must be > 0"),
        ({"image_std": [0.2, float("inf"), 0.2]}, "image_std=.* must be 3 finite numbers"),
        ({"image_std": 0.5}, "image_std=0.5 must be 3 finite numbers"),
        ({"size": {"shortest_edge": 300}}, "is not a letterbox size"),
        ({"size": {"height": 0, "width": 448}}, "is not a letterbox size"),
        ({"resample": 0}, "resample=0 is not supported"),
        ({"do_resize": False}, "do_resize=False"),
        ({"do_center_crop": True}, "do_center_crop=True"),
        ({"do_pad": True}, "do_pad=True"),
        ({"rescale_factor": 0.0}, "rescale_factor=0.0"),
        ({"max_image_pixels": -5}, "max_image_pixels=-5"),
    ],
)
def test_bad_options_are_refused_naming_them(option, message):
    with pytest.raises(ValueError, match=message):
        DetrisImageProcessor(**option)
    with pytest.raises(ValueError, match=message):
        DetrisImageProcessor()(np.zeros((8, 8, 3), np.uint8), **option)


def test_image_mean_and_std_are_honoured():
    rgb = np.full((448, 448, 3), 255, np.uint8)
    out = DetrisImageProcessor(image_mean=[0.5, 0.25, 0.0], image_std=[0.5, 0.25, 2.0])(rgb)["pixel_values"][0]
    assert np.allclose(out[:, 0, 0], [1.0, 3.0, 0.5])
    assert same(DetrisImageProcessor(do_normalize=False)(rgb)["pixel_values"], np.ones((1, 3, 448, 448), np.float32))


@pytest.mark.parametrize("size", [224, (160, 224), {"height": 224, "width": 160}, "sizedict"])
def test_every_valid_size_is_honoured(size, tmp_path):
    from transformers.image_utils import SizeDict

    if size == "sizedict":
        size = SizeDict(height=96, width=128)
    processor = DetrisImageProcessor(size=size)
    height, width = processor.size.height, processor.size.width
    out = processor(np.zeros((37, 53, 3), np.uint8))
    assert out["pixel_values"].shape == (1, 3, height, width)
    processor.save_pretrained(tmp_path)
    reloaded = DetrisImageProcessor.from_pretrained(tmp_path)
    assert same(reloaded(np.zeros((37, 53, 3), np.uint8))["pixel_values"], out["pixel_values"])
    assert DetrisImageProcessor()(np.zeros((37, 53, 3), np.uint8), size=size)["pixel_values"].shape[-2:] == (height, width)


def test_half_precision_tensors_are_read():
    image = torch.rand(3, 37, 53)
    reference = DetrisImageProcessor()(image.to(torch.bfloat16).float())["pixel_values"]
    for dtype in (torch.bfloat16, torch.float16):
        assert same(DetrisImageProcessor()(image.to(dtype).float())["pixel_values"],
                           DetrisImageProcessor()(image.to(dtype))["pixel_values"])
    assert reference.shape == (1, 3, 448, 448)
    mask = torch.zeros(37, 53, dtype=torch.bfloat16)
    mask[5:20, 5:30] = 1
    labels = DetrisImageProcessor()(image, masks=mask)["labels"]
    assert labels.max() == 1.0


def test_non_image_files_are_named_in_one_error(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt' is corrupt or not an image"):
        DetrisImageProcessor()(str(notes))
    with pytest.raises(ValueError, match=r"The image 'a/b.png' is corrupt or not an image"):
        DetrisImageProcessor()({"bytes": b"nope", "path": "a/b.png"})
