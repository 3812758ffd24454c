# Copyright 2025 The detris-hf authors. Licensed under the MIT License.
"""Image processor for DETRIS: the official affine letterbox, CLIP normalisation, and mask post-processing.

Pre-processing (official `utils/dataset.py`):

1. decode to RGB exactly like OpenCV's `imread`/`imdecode(IMREAD_COLOR)` followed by BGR->RGB (EXIF orientation
   applied, alpha dropped without compositing, grey replicated to 3 channels, 16-bit samples `>> 8`);
2. letterbox with an affine warp: `s = min(H_in / h, W_in / w)`, the content is scaled by `s` (sizes kept as
   floats) and centred; the 2x3 matrix is `cv2.getAffineTransform` of the three corners `(0, 0), (w, 0), (0, h)`
   (float32 points), the warp is `cv2.warpAffine(..., INTER_CUBIC)` with the CLIP mean colour (x255) as border;
3. `x / 255`, minus the CLIP mean, divided by the CLIP std (float32; also for the DINOv2 branch), channels first.

Training masks are warped with the same matrix, `INTER_LINEAR`, border 0, on uint8 0..255 values, then `/ 255`
(soft labels in [0, 1]).

Post-processing (official `engine/engine.py`, test mode): `sigmoid` -> bicubic (`align_corners=True`) upsampling to
the input size -> inverse affine warp to the original `(h, w)` with cubic interpolation and border 0 -> `> 0.35`.
"""

import io
import math
import os
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType


# Decompression-bomb guard: 8192 x 8192 = 67,108,864 pixels (an 8K square; PIL warns at 89.5 M). Any image with
# more pixels is refused with a ValueError before it is decoded (paths/bytes) or converted (arrays, PIL images).
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
DEFAULT_INPUT_SIZE = 448
DEFAULT_THRESHOLD = 0.35


class DetrisImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    max_image_pixels (`int`, *optional*, defaults to `8192 * 8192`):
        Largest accepted `height * width` of an input image (decompression-bomb guard). Larger images raise a
        `ValueError` before they are decoded.
    """

    max_image_pixels: int | None


# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------


def get_letterbox_affine(
    height: int, width: int, target_height: int = DEFAULT_INPUT_SIZE, target_width: int = DEFAULT_INPUT_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """
    The official letterbox matrices for an image of `(height, width)` pixels.

    `scale = min(target_height / height, target_width / width)`; the scaled size `(width * scale, height * scale)`
    stays fractional and is centred. Both matrices come from `cv2.getAffineTransform` on float32 corner points,
    as in the official code, so they are bit-identical to the official ones.

    Returns:
        `(affine, inverse_affine)`: two float64 `2x3` matrices. `affine` maps original pixel coordinates to
        letterbox coordinates, `inverse_affine` maps back.
    """
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"Image size must be positive, got (height, width) = ({height}, {width})")
    scale = min(target_height / height, target_width / width)
    new_width, new_height = width * scale, height * scale
    bias_x, bias_y = (target_width - new_width) / 2.0, (target_height - new_height) / 2.0
    src = np.array([[0, 0], [width, 0], [0, height]], dtype=np.float32)
    dst = np.array(
        [[bias_x, bias_y], [new_width + bias_x, bias_y], [bias_x, new_height + bias_y]], dtype=np.float32
    )
    with np.errstate(all="ignore"):
        affine, inverse = cv2.getAffineTransform(src, dst), cv2.getAffineTransform(dst, src)
    # Degenerate aspect ratios (content thinner than ~1e-4 letterbox pixel, e.g. 30,000,000 x 1) make the float32
    # corner points collapse and the official system singular; only then use the exact float64 matrices.
    corners = np.array([[0, 0], [width, 0], [0, height], [width, height]], dtype=np.float64)
    expected = np.array(
        [[bias_x, bias_y], [bias_x + new_width, bias_y], [bias_x, bias_y + new_height],
         [bias_x + new_width, bias_y + new_height]]
    )
    with np.errstate(all="ignore"):
        mapped = apply_affine_to_points(affine, corners)
        back = apply_affine_to_points(inverse, mapped)
    if not (
        np.isfinite(affine).all() and np.isfinite(inverse).all()
        and np.abs(mapped - expected).max() <= 1e-2 and np.abs(back - corners).max() <= 0.5
    ):
        affine = np.array([[scale, 0.0, bias_x], [0.0, scale, bias_y]])
        inverse = np.array([[1.0 / scale, 0.0, -bias_x / scale], [0.0, 1.0 / scale, -bias_y / scale]])
    return affine, inverse


def apply_affine_to_points(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map `(N, 2)` points `(x, y)` with a `2x3` affine matrix (OpenCV pixel convention: pixel centres at integers)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    affine = np.asarray(affine, dtype=np.float64)
    return points @ affine[:, :2].T + affine[:, 2]


# ----------------------------------------------------------------------------------------------------------------
# Decoding to RGB uint8 like OpenCV
# ----------------------------------------------------------------------------------------------------------------


def _check_size(height: int, width: int, max_pixels: int | None, what: str = "image"):
    if height <= 0 or width <= 0:
        raise ValueError(f"Got a zero-size {what} of (height, width) = ({height}, {width}); expected at least 1x1.")
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(
            f"The {what} has {height} x {width} = {height * width} pixels, more than the limit "
            f"max_image_pixels={max_pixels} (decompression-bomb guard). Downscale it first or raise "
            f"`max_image_pixels` on the image processor."
        )


def _cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """OpenCV's CMYK JPEG conversion, on PIL's CMYK values: `R = (255 - K) - ((C * (255 - K)) >> 8)`."""
    cmyk = cmyk.astype(np.int32)
    k_inv = 255 - cmyk[..., 3:4]
    rgb = k_inv - ((cmyk[..., :3] * k_inv) >> 8)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def _pil_to_rgb(
    image: "Image.Image", max_pixels: int | None, convert_rgb: bool = True, name: str = "the PIL image"
) -> np.ndarray:
    width, height = image.size
    _check_size(height, width, max_pixels)
    if not convert_rgb and image.mode != "RGB":
        _refuse_conversion(f"{name} has mode {image.mode!r}")
    try:
        image = ImageOps.exif_transpose(image)
        mode = image.mode
        if mode == "RGB":
            return np.asarray(image, dtype=np.uint8)
        if mode in ("RGBA", "RGBX", "RGBa"):
            return np.ascontiguousarray(np.asarray(image)[..., :3])
        if mode == "L":
            return _grey_to_rgb(np.asarray(image))
        if mode in ("LA", "La"):
            return _grey_to_rgb(np.asarray(image)[..., 0])
        if mode == "1":
            return _grey_to_rgb(np.asarray(image.convert("L")))
        if mode.startswith("I;16"):
            return _grey_to_rgb((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
        if mode == "I":  # 32-bit integer grey (e.g. 16-bit PNGs in old Pillow): treated as 16-bit samples
            return _grey_to_rgb((np.clip(np.asarray(image), 0, 65535).astype(np.uint16) >> 8).astype(np.uint8))
        if mode == "CMYK":
            return _cmyk_to_rgb(np.asarray(image))
        if mode == "F":
            raise ValueError(
                "PIL images of mode 'F' (32-bit float) are not supported; convert to an 8-bit mode ('L' or 'RGB')."
            )
        return np.asarray(image.convert("RGB"), dtype=np.uint8)  # P, PA, YCbCr, LAB, HSV, ...
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"Could not decode {name} ({error}); the file looks corrupt or truncated.") from error


def _refuse_conversion(what: str):
    raise ValueError(
        f"{what}, but do_convert_rgb=False asks for no colour conversion; DETRIS needs 3-channel RGB input. Pass "
        "RGB images or leave do_convert_rgb=True (grey, alpha, palette and CMYK are then converted like OpenCV)."
    )


def _decode_bytes(
    data: bytes, max_pixels: int | None, convert_rgb: bool = True, name: str = "The image bytes"
) -> np.ndarray:
    """Decode an encoded image exactly like the official code: `cv2.imdecode(IMREAD_COLOR)` then BGR -> RGB. The
    header is read with PIL first (no pixel decoding) to enforce the pixel limit. `name` (e.g. the file path) is
    named in every error."""
    if len(data) == 0:
        raise ValueError(f"{name} is an empty byte string; expected encoded image bytes (PNG, JPEG, ...).")
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            mode = header.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name} is corrupt or not an image ({error}); expected a PNG, JPEG, WebP, BMP, TIFF or "
                         "GIF file.") from error
    try:
        _check_size(height, width, max_pixels)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    if not convert_rgb and mode != "RGB":
        _refuse_conversion(f"{name} has mode {mode!r}")
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if decoded is None or decoded.size == 0:
        raise ValueError(f"OpenCV could not decode {name}; the file is corrupt or truncated.")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _array_to_rgb(
    array: np.ndarray, max_pixels: int | None, channels_first: bool | None, source: str, convert_rgb: bool = True
) -> np.ndarray:
    if array.ndim == 2:
        pass
    elif array.ndim == 3:
        last_ok, first_ok = array.shape[-1] in (1, 2, 3, 4), array.shape[0] in (1, 2, 3, 4)
        if channels_first is None:
            # numpy arrays are HWC by convention, torch tensors CHW; fall back to the other layout if needed.
            channels_first = (first_ok and not last_ok) if source == "numpy" else (first_ok or not last_ok)
        if channels_first and not first_ok or not channels_first and not last_ok:
            raise ValueError(
                f"Cannot find the channel axis of a {source} image of shape {tuple(array.shape)}: expected (H, W), "
                f"(H, W, C) or (C, H, W) with C in 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)."
            )
        if channels_first:
            array = np.moveaxis(array, 0, -1)
    else:
        raise ValueError(
            f"A {source} image must have 2 or 3 dimensions ((H, W), (H, W, C) or (C, H, W)), got shape "
            f"{tuple(array.shape)}."
        )
    height, width = array.shape[:2]
    _check_size(height, width, max_pixels)

    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"Integer {source} images of dtype {array.dtype} must hold 0..255 values, got range [{low}, {high}]; "
                "pass uint8 (or uint16, which is reduced with >> 8 like OpenCV)."
            )
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if np.isnan(array).any():
            raise ValueError(f"The floating-point {source} image contains NaN values.")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"Floating-point {source} images must hold values in [0, 1] (they are scaled by 255), got range "
                f"[{low}, {high}]; pass uint8 pixels (0..255) instead."
            )
        array = np.rint(array * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"Unsupported {source} image dtype {array.dtype}; expected uint8.")

    if not convert_rgb and (array.ndim == 2 or array.shape[-1] != 3):
        channels = 1 if array.ndim == 2 else array.shape[-1]
        _refuse_conversion(f"A {source} image of shape {tuple(array.shape)} has {channels} channel(s)")
    if array.ndim == 2:
        return _grey_to_rgb(array)
    channels = array.shape[-1]
    if channels in (1, 2):  # grey (+ alpha): alpha dropped, grey replicated
        return _grey_to_rgb(array[..., 0])
    if channels == 4:  # RGBA: alpha dropped without compositing, as OpenCV's IMREAD_COLOR
        array = array[..., :3]
    return np.ascontiguousarray(array)


def to_rgb_uint8(
    image: Any, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, input_data_format=None, convert_rgb: bool = True
) -> np.ndarray:
    """
    Convert one image to an RGB `uint8` `(H, W, 3)` array the way the official OpenCV decoding does.

    Accepted inputs:
    - a path (`str` / `os.PathLike`) or encoded bytes: decoded with `cv2.imdecode(IMREAD_COLOR)` (EXIF applied);
    - a `PIL.Image.Image`: EXIF orientation applied; RGBA/LA drop alpha (no compositing), grey/1-bit/palette become
      RGB, `I;16` is reduced with `>> 8`, CMYK uses OpenCV's formula;
    - a numpy array or torch tensor: `(H, W)`, `(H, W, C)` or `(C, H, W)`, C in {1, 2, 3, 4}; numpy defaults to
      channels-last and torch to channels-first when ambiguous (`input_data_format` overrides). uint8 as is,
      uint16 `>> 8`, bool x255, floats must be in [0, 1] (x255, rounded).

    With `convert_rgb=False` (the processor's `do_convert_rgb=False`) nothing is converted: anything but a 3-channel
    RGB image raises a `ValueError`. bfloat16 / float16 tensors are read as float32.

    Raises `ValueError` for zero-size, over-limit (`max_image_pixels`), corrupt or unsupported images; a path or a
    `{"path", "bytes"}` dict is named in the message.
    """
    channels_first = None
    if input_data_format is not None:
        channels_first = str(getattr(input_data_format, "value", input_data_format)) == "channels_first"
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path.startswith(("http://", "https://")):
            raise ValueError(f"URLs are not fetched by the DETRIS image processor (offline); got {path!r}.")
        if not os.path.isfile(path):
            raise ValueError(f"Image path {path!r} does not exist or is not a file.")
        with open(path, "rb") as handle:
            return _decode_bytes(handle.read(), max_image_pixels, convert_rgb, f"The file {path!r}")
    if isinstance(image, dict) and ("bytes" in image or "path" in image):  # a `datasets.Image(decode=False)` value
        if image.get("bytes") is not None:
            name = f"The image {image['path']!r}" if image.get("path") else "The image bytes"
            return _decode_bytes(bytes(image["bytes"]), max_image_pixels, convert_rgb, name)
        if image.get("path"):
            return to_rgb_uint8(image["path"], max_image_pixels, input_data_format, convert_rgb)
        raise ValueError("The image dict has neither 'bytes' nor 'path'; expected a `datasets.Image` value.")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(image), max_image_pixels, convert_rgb)
    if isinstance(image, Image.Image):
        name = f"The image {image.filename!r}" if getattr(image, "filename", "") else "The PIL image"
        return _pil_to_rgb(image, max_image_pixels, convert_rgb, name)
    if isinstance(image, torch.Tensor):
        if image.ndim in (2, 3):
            _check_size(*(image.shape[:2] if image.ndim == 2 else _hw_of(image.shape, channels_first, "torch")),
                        max_image_pixels)
        if image.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
            image = image.float()
        return _array_to_rgb(image.detach().cpu().numpy(), max_image_pixels, channels_first, "torch", convert_rgb)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, max_image_pixels, channels_first, "numpy", convert_rgb)
    raise TypeError(
        f"Unsupported image type {type(image).__name__}; expected a PIL image, a numpy array, a torch tensor, "
        "a file path, encoded bytes or a {'path', 'bytes'} dict."
    )


def _hw_of(shape, channels_first, source):
    if channels_first is None:
        channels_first = shape[0] in (1, 2, 3, 4) or shape[-1] not in (1, 2, 3, 4)
    return (shape[1], shape[2]) if channels_first else (shape[0], shape[1])


def to_mask_uint8(mask: Any, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """
    Convert one ground-truth mask to `uint8` `(H, W)` with 0..255 values, the scale of the official mask PNGs.

    bool masks and integer masks whose maximum is 1 are binary (-> 0/255); other integer masks must be 0..255 (the
    official PNGs hold 0/255, 254 on overlaps); float masks must lie in [0, 1] (x255, rounded). A PIL image is
    read as grey ('1' -> 0/255, palette/RGB via `convert("L")`). A trailing or leading singleton channel is dropped.
    """
    if isinstance(mask, Image.Image):
        width, height = mask.size
        _check_size(height, width, max_image_pixels, "mask")
        mask = np.asarray(mask if mask.mode in ("1", "L", "I;16", "I") else mask.convert("L"))
    elif isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu()
        mask = (mask.float() if mask.dtype in (torch.bfloat16, torch.float16) else mask).numpy()
    elif not isinstance(mask, np.ndarray):
        raise TypeError(f"Unsupported mask type {type(mask).__name__}; expected a numpy array, torch tensor or PIL image.")
    if mask.ndim == 3 and 1 in (mask.shape[0], mask.shape[-1]):
        mask = mask[0] if mask.shape[0] == 1 else mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"A mask must be 2-D (H, W), got shape {tuple(mask.shape)}.")
    _check_size(mask.shape[0], mask.shape[1], max_image_pixels, "mask")
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8) * 255
    if np.issubdtype(mask.dtype, np.integer):
        low, high = int(mask.min()), int(mask.max())
        if low < 0 or high > 255:
            raise ValueError(f"Integer masks must hold 0..255 (or 0/1) values, got range [{low}, {high}].")
        return mask.astype(np.uint8) * (255 if high == 1 else 1)
    if np.issubdtype(mask.dtype, np.floating):
        if np.isnan(mask).any() or float(mask.min()) < 0.0 or float(mask.max()) > 1.0:
            raise ValueError("Float masks must hold values in [0, 1] without NaN.")
        return np.rint(mask * 255.0).astype(np.uint8)
    raise ValueError(f"Unsupported mask dtype {mask.dtype}.")


# ----------------------------------------------------------------------------------------------------------------
# Image processor
# ----------------------------------------------------------------------------------------------------------------


class DetrisImageProcessor(PilBackend):
    r"""
    Constructs a DETRIS image processor: the official affine letterbox to `size` (448x448), CLIP mean/std
    normalisation, optional training labels from masks, and [`~DetrisImageProcessor.post_process_referring_segmentation`].

    Outputs of `__call__` (a [`BatchFeature`]):
    - `pixel_values`: `(B, 3, H_in, W_in)` float32, normalised with the CLIP mean/std;
    - `original_sizes`: `(B, 2)` int64 `(height, width)` of each decoded image (after EXIF orientation);
    - `inverse_affines`: `(B, 2, 3)` float64 letterbox-to-original matrices (OpenCV convention);
    - `labels` (only when `masks` are given): `(B, H_in, W_in)` float32 soft masks in [0, 1].

    Args:
        size (`int`, `(height, width)`, `dict` or `SizeDict`, *optional*, defaults to `{"height": 448, "width": 448}`):
            letterbox size (positive `height` and `width`).
        image_mean / image_std (3 finite floats each, *optional*, default to the OpenAI CLIP statistics):
            normalisation statistics; every std must be > 0.
        do_rescale / do_normalize (`bool`, *optional*, default to `True`): `* rescale_factor` (1/255) and mean/std
            normalisation.
        do_convert_rgb (`bool`, *optional*, defaults to `True`): convert grey / alpha / palette / CMYK images to RGB
            like OpenCV; with `False` only 3-channel RGB images are accepted.
        max_image_pixels (`int`, *optional*, defaults to `8192 * 8192`): decompression-bomb guard for inputs and
            post-processing target sizes, see [`DetrisImageProcessorKwargs`].

    Every option is honoured or refused with a `ValueError` naming it (at construction and per call): the letterbox
    is always applied and always bicubic (`do_resize=False`, another `resample`, `do_center_crop`, `do_pad` and a
    channels-last `data_format` are refused), because DETRIS needs inputs of exactly `size`.
    """

    valid_kwargs = DetrisImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BICUBIC  # documentary: the letterbox is cv2.warpAffine(INTER_CUBIC)
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": DEFAULT_INPUT_SIZE, "width": DEFAULT_INPUT_SIZE}
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS

    def __init__(self, **kwargs: Unpack[DetrisImageProcessorKwargs]):
        super().__init__(**_size_as_dict(kwargs))
        options = {name: getattr(self, name, None) for name in self._valid_kwargs_names}
        self._validate_preprocess_kwargs(**self._standardize_kwargs(**options))  # bad values fail here, not per call

    def _validate_preprocess_kwargs(
        self,
        do_resize=None,
        size=None,
        resample=None,
        do_rescale=None,
        rescale_factor=None,
        do_normalize=None,
        image_mean=None,
        image_std=None,
        do_center_crop=None,
        do_pad=None,
        data_format=None,
        max_image_pixels=None,
        **kwargs,
    ):
        """Refuse, naming the option, every documented option this processor cannot honour and every invalid value."""
        if do_resize is False:
            raise ValueError("do_resize=False is not supported: DETRIS always letterboxes its inputs to `size`.")
        height, width = (getattr(size, "height", None), getattr(size, "width", None)) if size is not None else (None, None)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
            raise ValueError(
                f"size={dict(size) if size is not None else None} is not a letterbox size; expected positive "
                '{"height": H, "width": W} (or an int for a square), e.g. {"height": 448, "width": 448}.'
            )
        if resample is not None and int(resample) != int(PILImageResampling.BICUBIC):
            raise ValueError(
                f"resample={resample!r} is not supported: the official letterbox is bicubic (cv2.INTER_CUBIC); "
                "leave resample unset or BICUBIC (3)."
            )
        if do_center_crop:
            raise ValueError("do_center_crop=True is not supported: DETRIS letterboxes the whole image, it never crops.")
        if do_pad:
            raise ValueError("do_pad=True is not supported: the letterbox already pads every image to `size`.")
        if data_format is not None and str(getattr(data_format, "value", data_format)) != "channels_first":
            raise ValueError(f"data_format={data_format!r} is not supported: pixel_values are channels first (B, 3, H, W).")
        if do_rescale and not (isinstance(rescale_factor, (int, float)) and math.isfinite(rescale_factor) and rescale_factor > 0):
            raise ValueError(f"rescale_factor={rescale_factor!r} must be a finite number > 0 (1/255 for uint8 pixels).")
        for name, values in (("image_mean", image_mean), ("image_std", image_std)):
            if not do_normalize and values is None:
                continue
            flat = np.asarray(values, dtype=object).ravel() if values is not None else np.asarray([])
            if values is None or flat.size != 3 or not all(
                isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(v)
                for v in flat
            ):
                example = list(OPENAI_CLIP_MEAN if name == "image_mean" else OPENAI_CLIP_STD)
                raise ValueError(f"{name}={values!r} must be 3 finite numbers, one per RGB channel, e.g. {example}.")
            if name == "image_std" and any(float(v) <= 0 for v in flat):
                raise ValueError(f"image_std={values!r} must be > 0 in every channel (the pixels are divided by it).")
        if max_image_pixels is not None and (
            isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels <= 0
        ):
            raise ValueError(f"max_image_pixels={max_image_pixels!r} must be a positive int (or None for no limit).")

    # -- pre-processing ------------------------------------------------------------------------------------------

    def preprocess(self, images, masks=None, **kwargs: Unpack[DetrisImageProcessorKwargs]) -> BatchFeature:
        r"""
        Letterbox and normalise `images` (one image or a list); optionally turn `masks` (one per image, same
        `(height, width)` as its image) into soft `labels`.
        """
        return super().preprocess(images, image_like_kwargs={"masks": masks}, **_size_as_dict(kwargs))

    def _preprocess_image_like_inputs(self, images, masks=None, **kwargs) -> BatchFeature:
        images = as_image_list(images, "images")
        if masks is not None:
            masks = as_image_list(masks, "masks")
            if len(masks) != len(images):
                raise ValueError(f"Got {len(images)} images but {len(masks)} masks; expected one mask per image.")
        return self._preprocess(images, masks=masks, **kwargs)

    def _preprocess(
        self,
        images: list,
        masks: list | None = None,
        size=None,
        do_convert_rgb: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean=None,
        image_std=None,
        max_image_pixels: int | None = None,
        input_data_format=None,
        return_tensors: str | TensorType | None = None,
        **kwargs,
    ) -> BatchFeature:
        target_height, target_width = int(size.height), int(size.width)
        border = tuple(float(m) * 255.0 for m in (image_mean if image_mean is not None else OPENAI_CLIP_MEAN))
        mean = np.asarray(image_mean, dtype=np.float32).reshape(3, 1, 1) if do_normalize else None
        std = np.asarray(image_std, dtype=np.float32).reshape(3, 1, 1) if do_normalize else None
        convert_rgb = do_convert_rgb is not False

        pixel_values, original_sizes, inverse_affines, labels = [], [], [], []
        for index, image in enumerate(images):
            rgb = to_rgb_uint8(image, max_image_pixels, input_data_format, convert_rgb)
            height, width = rgb.shape[:2]
            affine, inverse = get_letterbox_affine(height, width, target_height, target_width)
            boxed = letterbox_image(rgb, affine, (target_height, target_width), border)
            pixels = boxed.transpose(2, 0, 1).astype(np.float32)
            if do_rescale:  # official: float32 division by 255
                pixels = pixels / np.float32(1.0 / rescale_factor)
            if do_normalize:
                pixels = (pixels - mean) / std
            pixel_values.append(pixels)
            original_sizes.append((height, width))
            inverse_affines.append(inverse)
            if masks is not None:
                mask = to_mask_uint8(masks[index], max_image_pixels)
                if mask.shape != (height, width):
                    raise ValueError(
                        f"Mask {index} has shape {mask.shape} but its image is {(height, width)} (height, width) "
                        "after decoding; expected the same size."
                    )
                warped = letterbox_mask(mask, affine, (target_height, target_width))
                labels.append(warped.astype(np.float32) / np.float32(255.0))

        data = {
            "pixel_values": np.stack(pixel_values),
            "original_sizes": np.asarray(original_sizes, dtype=np.int64),
            "inverse_affines": np.stack(inverse_affines).astype(np.float64),
        }
        if masks is not None:
            data["labels"] = np.stack(labels)
        return BatchFeature(data=data, tensor_type=return_tensors)

    # -- post-processing -----------------------------------------------------------------------------------------

    def post_process_referring_segmentation(
        self,
        logits,
        target_sizes,
        threshold: float = DEFAULT_THRESHOLD,
        implementation: str = "torch",
    ) -> list[torch.Tensor]:
        r"""
        Turn DETRIS logits into one boolean mask per sample at its original `(height, width)`, in the official
        order: `sigmoid` -> bicubic upsampling (`align_corners=True`) to the letterbox size -> inverse affine warp
        (cubic, border 0) -> `> threshold`.

        Args:
            logits (`torch.Tensor` or a model output with `.logits`): `(B, 1, h, w)` or `(B, h, w)` logits
                (128x128 for a 448 input). Must not contain NaN.
            target_sizes (`torch.Tensor`, `np.ndarray` or list of `(height, width)`): original size of every sample,
                e.g. the processor's `original_sizes`. The letterbox matrix is a function of this size alone.
            threshold (`float`, *optional*, defaults to 0.35): probability threshold (strict `>`).
            implementation (`str`, *optional*, defaults to `"torch"`):
                - `"torch"`: batched on the logits' device (`grid_sample`, bicubic, zeros padding);
                - `"opencv"`: the reference path, `cv2.warpAffine(INTER_CUBIC)` on CPU exactly as the official code.
                Both agree to within a few boundary pixels (measured >= 99.99 % identical on the goldens).

        Returns:
            `list[torch.Tensor]`: boolean masks of shape `(height, width)` on the logits' device.
        """
        logits = getattr(logits, "logits", logits)
        if not isinstance(logits, torch.Tensor):
            logits = torch.as_tensor(np.asarray(logits))
        if logits.ndim == 3:
            logits = logits[:, None]
        if logits.ndim != 4 or logits.shape[1] != 1:
            raise ValueError(f"Expected logits of shape (B, 1, h, w) or (B, h, w), got {tuple(logits.shape)}.")
        if not torch.is_floating_point(logits):
            raise ValueError(f"Expected floating-point logits, got dtype {logits.dtype}.")
        if torch.isnan(logits).any():
            bad = torch.isnan(logits.flatten(1)).any(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"The logits contain NaN (samples {bad}); cannot post-process them.")
        if not 0.0 <= float(threshold) < 1.0:
            raise ValueError(f"threshold must be a probability in [0, 1), got {threshold}.")
        sizes = _target_sizes_to_list(target_sizes)
        if len(sizes) != logits.shape[0]:
            raise ValueError(f"Got {logits.shape[0]} logits but {len(sizes)} target sizes; expected one size per sample.")
        for height, width in sizes:  # refused before anything of that size is allocated
            _check_size(height, width, self.max_image_pixels, "target size")

        size = self.size
        input_height, input_width = int(size["height"]), int(size["width"])
        probabilities = torch.sigmoid(logits.float())
        probabilities = F.interpolate(
            probabilities, size=(input_height, input_width), mode="bicubic", align_corners=True
        )[:, 0]

        if implementation == "opencv":
            return _inverse_letterbox_opencv(probabilities, sizes, threshold, logits.device)
        if implementation == "torch":
            return _inverse_letterbox_torch(probabilities, sizes, threshold)
        raise ValueError(f"implementation must be 'torch' or 'opencv', got {implementation!r}.")


def _size_as_dict(kwargs: dict) -> dict:
    """transformers' kwarg validation refuses its own `SizeDict` (what `processor.size` holds); pass it as a dict."""
    if isinstance(kwargs.get("size"), SizeDict):
        kwargs["size"] = {key: value for key, value in dict(kwargs["size"]).items() if value is not None}
    return kwargs


def letterbox_image(
    rgb: np.ndarray, affine: np.ndarray, output_size: tuple[int, int], border=tuple(m * 255.0 for m in OPENAI_CLIP_MEAN)
) -> np.ndarray:
    """The official letterbox of a uint8 RGB `(H, W, 3)` image: `cv2.warpAffine(rgb, affine, (W_out, H_out),
    INTER_CUBIC, BORDER_CONSTANT, border)`, `border` the CLIP mean x255. Returns uint8 `(H_out, W_out, 3)`."""
    height, width = output_size
    return cv2.warpAffine(
        np.ascontiguousarray(rgb), affine, (width, height), flags=cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_CONSTANT, borderValue=border,
    )


def letterbox_mask(mask: np.ndarray, affine: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
    """The official letterbox of a uint8 0..255 mask `(H, W)`: `cv2.warpAffine(INTER_LINEAR)`, border 0. Returns
    uint8 `(H_out, W_out)` with soft edges; divide by 255 for the training labels."""
    height, width = output_size
    return cv2.warpAffine(
        np.ascontiguousarray(mask), affine, (width, height), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )


def _inverse_letterbox_opencv(probabilities, sizes, threshold, device) -> list[torch.Tensor]:
    input_height, input_width = probabilities.shape[-2:]
    maps = probabilities.detach().cpu().numpy()
    masks = []
    for prob, (height, width) in zip(maps, sizes):
        _, inverse = get_letterbox_affine(height, width, input_height, input_width)
        warped = cv2.warpAffine(
            np.ascontiguousarray(prob, dtype=np.float32), inverse, (width, height), flags=cv2.INTER_CUBIC,
            borderMode=cv2.BORDER_CONSTANT, borderValue=0.0,
        )
        masks.append(torch.from_numpy(warped > threshold).to(device))
    return masks


def _inverse_letterbox_torch(probabilities, sizes, threshold) -> list[torch.Tensor]:
    """Inverse warp with `grid_sample` (bicubic, A=-0.75 like OpenCV, zeros outside), batched over samples that
    share an original size. Output pixel `(x, y)` samples the letterbox map at `affine @ (x, y, 1)`."""
    input_height, input_width = probabilities.shape[-2:]
    device = probabilities.device
    masks: list[torch.Tensor | None] = [None] * len(sizes)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, hw in enumerate(sizes):
        groups.setdefault(hw, []).append(index)
    for (height, width), indices in groups.items():
        affine, _ = get_letterbox_affine(height, width, input_height, input_width)
        affine = torch.as_tensor(affine, dtype=torch.float64, device=device)
        xs = torch.arange(width, dtype=torch.float64, device=device)
        ys = torch.arange(height, dtype=torch.float64, device=device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        u = affine[0, 0] * grid_x + affine[0, 1] * grid_y + affine[0, 2]
        v = affine[1, 0] * grid_x + affine[1, 1] * grid_y + affine[1, 2]
        # align_corners=True: -1 and +1 are the centres of the first and last letterbox pixels.
        grid = torch.stack((2.0 * u / (input_width - 1) - 1.0, 2.0 * v / (input_height - 1) - 1.0), dim=-1)
        grid = grid.to(probabilities.dtype)[None].expand(len(indices), -1, -1, -1)
        batch = probabilities[indices][:, None]
        warped = F.grid_sample(batch, grid, mode="bicubic", padding_mode="zeros", align_corners=True)[:, 0]
        for position, index in enumerate(indices):
            masks[index] = warped[position] > threshold
    return masks


def _target_sizes_to_list(target_sizes) -> list[tuple[int, int]]:
    if isinstance(target_sizes, torch.Tensor):
        target_sizes = target_sizes.detach().cpu().tolist()
    elif isinstance(target_sizes, np.ndarray):
        target_sizes = target_sizes.tolist()
    if isinstance(target_sizes, tuple) and len(target_sizes) == 2 and all(isinstance(v, int) for v in target_sizes):
        target_sizes = [target_sizes]
    sizes = []
    for entry in target_sizes:
        if len(entry) != 2:
            raise ValueError(f"Each target size must be (height, width), got {entry!r}.")
        sizes.append((int(entry[0]), int(entry[1])))
    return sizes


def as_image_list(value, name: str = "images") -> list:
    """One image (or mask) or a batch -> a non-empty list; a 4-D array or tensor is a batch along its first axis."""
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"`{name}` is an empty list; expected at least one item.")
        return list(value)
    if isinstance(value, np.ndarray) and value.ndim == 4 or isinstance(value, torch.Tensor) and value.ndim == 4:
        if value.shape[0] == 0:
            raise ValueError(f"`{name}` is an empty batch of shape {tuple(value.shape)}.")
        return list(value)
    return [value]


# A saved processor folder names these classes in its `auto_map` and carries their files, so it also loads with
# `trust_remote_code=True` where this package is not imported.
DetrisImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DetrisImageProcessor",
    "apply_affine_to_points",
    "get_letterbox_affine",
    "as_image_list",
    "letterbox_image",
    "letterbox_mask",
    "to_mask_uint8",
    "to_rgb_uint8",
]
