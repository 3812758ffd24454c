"""Optional on-disk cache of letterboxed uint8 images and warped uint8 masks.

The expensive per-sample work of the official pipeline (JPEG decode, cubic
affine warp, mask rasterisation and warp) is done once; a training step then
only reads uint8 arrays from memory-mapped ``.npy`` files and picks a
pre-tokenised sentence.  Normalisation (``/255``, CLIP mean/std) runs later on
the accelerator with :class:`DeviceNormalizer`, whose lookup table is taken
from the processor itself, so cached and on-the-fly inputs are bit-identical.

Layout of ``cache_dir``::

    meta.json           size, counts, word_len, version
    images.npy          uint8 [n_images, 3, S, S]   letterboxed RGB (CHW), one per distinct image
    row_image.npy       int64 [n_rows]              row -> image index
    mask_data.npy       uint8 [total]               warped masks, cropped to their nonzero box, concatenated
    mask_index.npy      int64 [n_rows, 5]           (offset, y0, x0, h, w) of each row's crop
    sent_offsets.npy    int64 [n_rows + 1]          row -> range of tokenised sentences
    input_ids.npy       int64 [n_sents, word_len]   (only when a processor was given)
    original_sizes.npy  int64 [n_rows, 2]           (height, width)
    inverse_affine.npy  float64 [n_rows, 2, 3]      letterbox inverse (for evaluation)
    ref_ids.npy         int64 [n_rows]
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.image_utils import OPENAI_CLIP_MEAN as CLIP_MEAN
from transformers.image_utils import OPENAI_CLIP_STD as CLIP_STD

from processing_detris import get_letterbox_affine, letterbox_image, letterbox_mask, to_rgb_uint8
from configuration_detris.folders import atomic_folder

from .masks import decode_rle
from .rows import read_json
from .sentences import sentence_index

__all__ = ["build_letterbox_cache", "LetterboxCache", "DeviceNormalizer", "normalization_lut"]

CACHE_VERSION = 1


def _processor_size(processor, default: int = 448) -> int:
    ip = getattr(processor, "image_processor", None)
    for obj in (ip, processor):
        if obj is None:
            continue
        for name in ("input_size", "image_size"):
            v = getattr(obj, name, None)
            if isinstance(v, int):
                return v
        size = getattr(obj, "size", None)
        if hasattr(size, "get") and size.get("height"):  # a dict or transformers' SizeDict
            return int(size["height"])
        if isinstance(size, int):
            return size
    return default


def normalization_lut(processor=None, size: int = 448) -> torch.Tensor:
    """float32 [3, 256]: the normalised value of each uint8 level per channel.

    With a processor, the table is read off the processor's own output for a ``size`` x ``size``
    image (whose letterbox is the identity), so the device-side normalisation reproduces the
    processor exactly, whatever its order of operations.  Without one, the float32 formula
    ``(v / 255 - mean) / std`` is used.
    """
    if processor is None:
        v = torch.arange(256, dtype=torch.float32) / 255.0
        mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None]
        std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None]
        return (v[None, :] - mean) / std
    flat = (np.arange(size * size, dtype=np.int64) * 7) % 256
    img = np.stack([flat, (flat + 85) % 256, (flat + 170) % 256], axis=-1).reshape(size, size, 3).astype(np.uint8)
    pv = processor(images=[img], return_tensors="pt")["pixel_values"][0].to(torch.float32)
    if tuple(pv.shape) != (3, size, size):
        raise ValueError(f"processor returned pixel_values of shape {tuple(pv.shape)}, expected (3, {size}, {size})")
    lut = torch.empty(3, 256, dtype=torch.float32)
    for c in range(3):
        vals = torch.from_numpy(img[..., c].astype(np.int64)).reshape(-1)
        out = pv[c].reshape(-1)
        lut[c, vals] = out
        if not torch.equal(lut[c][vals], out):
            raise ValueError(
                "the processor's normalisation is not a per-pixel function of the uint8 value "
                "(or its letterbox is not the identity at the input size); cannot build a lookup table"
            )
    return lut


class DeviceNormalizer:
    """uint8 batches from :class:`LetterboxCache` -> float model inputs, on the batch's device."""

    def __init__(self, lut: torch.Tensor):
        lut = lut.to(torch.float32)
        self.lut = lut.reshape(-1)
        formula = normalization_lut(None)
        # when the processor's table is the float32 formula, compute it (cheaper than a gather on CPU):
        # the same correctly rounded float32 operations give bit-identical values.
        self.use_formula = lut.shape == formula.shape and torch.equal(lut, formula)
        self.mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(CLIP_STD, dtype=torch.float32).view(-1, 1, 1)

    @classmethod
    def from_processor(cls, processor=None, size: int | None = None) -> "DeviceNormalizer":
        return cls(normalization_lut(processor, size or _processor_size(processor)))

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        pix = batch["pixel_values"]
        if pix.dtype == torch.uint8 and self.use_formula:
            x = pix.to(torch.float32) / 255.0
            out["pixel_values"] = (x - self.mean.to(pix.device)) / self.std.to(pix.device)
        elif pix.dtype == torch.uint8:
            lut = self.lut.to(pix.device)
            offs = (torch.arange(pix.shape[-3], device=pix.device) * 256).view(-1, 1, 1)
            out["pixel_values"] = lut[pix.long() + offs]
        if "labels" in batch and batch["labels"].dtype == torch.uint8:
            out["labels"] = batch["labels"].to(torch.float32) / 255.0
        return out


def _image_key(row: dict):
    return (row.get("dataset", ""), int(row["image_id"]))


def build_letterbox_cache(
    ds,
    cache_dir: str,
    *,
    processor=None,
    size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Write the cache for an object-level ``datasets.Dataset`` (see module docstring).

    ``processor`` (optional) tokenises every sentence once and fixes the input size; the letterbox is
    the processor's own (`processing_detris.letterbox_image` / `letterbox_mask`), so the cache equals its output.
    The cache is written whole or not at all (``configuration_detris.folders.atomic_folder``).
    """
    size = int(size or (_processor_size(processor) if processor is not None else 448))
    cache_dir = os.path.abspath(cache_dir)
    with atomic_folder(cache_dir, overwrite=overwrite) as staging:
        tmp = str(staging)
        n = len(ds)
        keys = {}
        row_image = np.empty(n, np.int64)
        meta_cols = ds.select_columns([c for c in ("dataset", "image_id") if c in ds.column_names])
        for i, r in enumerate(meta_cols):
            row_image[i] = keys.setdefault(_image_key(r), len(keys))
        images = np.lib.format.open_memmap(os.path.join(tmp, "images.npy"), "w+", np.uint8, (len(keys), 3, size, size))
        done = np.zeros(len(keys), bool)
        mask_index = np.empty((n, 5), np.int64)
        sizes = np.empty((n, 2), np.int64)
        inv = np.empty((n, 2, 3), np.float64)
        ref_ids = np.empty(n, np.int64)
        sent_offsets = np.zeros(n + 1, np.int64)
        sentences: list[str] = []
        crops = []
        offset = 0
        for i, r in enumerate(tqdm(ds, total=n, desc="letterbox cache", disable=not progress, unit="row")):
            m = decode_rle(r["mask"])
            h, w = m.shape
            mat, mat_inv = get_letterbox_affine(h, w, size, size)
            k = row_image[i]
            if not done[k]:
                img = to_rgb_uint8(r["image"])
                if img.shape[:2] != (h, w):
                    raise ValueError(
                        f"ref_id={r.get('ref_id')}: image is {img.shape[0]}x{img.shape[1]}, mask is {h}x{w}; expected equal"
                    )
                images[k] = letterbox_image(img, mat, (size, size)).transpose(2, 0, 1)
                done[k] = True
            wm = letterbox_mask(m * np.uint8(255), mat, (size, size))
            ys, xs = np.nonzero(wm.any(axis=1))[0], np.nonzero(wm.any(axis=0))[0]
            if len(ys):
                y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
                crop = np.ascontiguousarray(wm[y0:y1, x0:x1])
            else:
                y0 = x0 = 0
                crop = np.zeros((0, 0), np.uint8)
            crops.append(crop.reshape(-1))
            mask_index[i] = (offset, y0, x0, crop.shape[0], crop.shape[1])
            offset += crop.size
            sizes[i] = (h, w)
            inv[i] = mat_inv
            ref_ids[i] = int(r.get("ref_id", i))
            sents = [r["sentence"]] if "sentence" in r and "sentences" not in r else list(r["sentences"])
            sentences.extend(sents)
            sent_offsets[i + 1] = sent_offsets[i] + len(sents)
        images.flush()
        del images
        np.save(os.path.join(tmp, "mask_data.npy"), np.concatenate(crops) if crops else np.zeros(0, np.uint8))
        for name, arr in (
            ("row_image", row_image), ("mask_index", mask_index), ("original_sizes", sizes),
            ("inverse_affine", inv), ("ref_ids", ref_ids), ("sent_offsets", sent_offsets),
        ):
            np.save(os.path.join(tmp, f"{name}.npy"), arr)
        word_len = None
        if processor is not None and sentences:
            ids = processor(text=sentences, return_tensors="pt")["input_ids"].numpy().astype(np.int64)
            np.save(os.path.join(tmp, "input_ids.npy"), ids)
            word_len = int(ids.shape[1])
        with open(os.path.join(tmp, "sentences.json"), "w", encoding="utf-8") as fh:
            json.dump(sentences, fh)
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump({"version": CACHE_VERSION, "size": size, "n_rows": n, "n_images": len(keys),
                       "n_sentences": len(sentences), "word_len": word_len}, fh)
    return cache_dir


class LetterboxCache(torch.utils.data.Dataset):
    """A map-style dataset over a cache: uint8 ``pixel_values`` [3, S, S], uint8 ``labels`` [S, S], ``input_ids``.

    ``train=True`` picks one sentence per item with the trainers' sampler (``sentence_index(n, seed, epoch, i)``).
    ``train=False`` yields ``sentence_index`` = 0 (use :meth:`sentence_items` for all sentences).
    Normalise batches on the device with :class:`DeviceNormalizer`.
    """

    def __init__(self, cache_dir: str, *, train: bool = True, seed: int = 0):
        self.meta = read_json(os.path.join(cache_dir, "meta.json"))
        if not isinstance(self.meta, dict) or self.meta.get("version") != CACHE_VERSION:
            version = self.meta.get("version") if isinstance(self.meta, dict) else None
            raise ValueError(f"{cache_dir}: cache version {version}, expected {CACHE_VERSION}; rebuild it")

        def load(name):  # memory-mapped, never unpickled; a damaged file is named
            path = os.path.join(cache_dir, f"{name}.npy")
            try:
                return np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as error:
                raise ValueError(f"{path}: not a readable cache array ({error}); rebuild the cache "
                                 "(detris data cache --overwrite)") from None
        self.images = load("images")
        self.row_image = np.asarray(load("row_image"))
        self.mask_data = load("mask_data")
        self.mask_index = np.asarray(load("mask_index"))
        self.sent_offsets = np.asarray(load("sent_offsets"))
        self.original_sizes = np.asarray(load("original_sizes"))
        self.inverse_affine = np.asarray(load("inverse_affine"))
        self.ref_ids = np.asarray(load("ref_ids"))
        self.input_ids = load("input_ids") if os.path.exists(os.path.join(cache_dir, "input_ids.npy")) else None
        self.size = int(self.meta["size"])
        self.train = train
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return len(self.row_image)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def mask(self, i: int) -> np.ndarray:
        off, y0, x0, h, w = (int(v) for v in self.mask_index[i])
        out = np.zeros((self.size, self.size), np.uint8)
        if h and w:
            out[y0:y0 + h, x0:x0 + w] = self.mask_data[off:off + h * w].reshape(h, w)
        return out

    def item(self, i: int, sentence_index: int) -> dict:
        out = {
            "pixel_values": torch.from_numpy(np.array(self.images[self.row_image[i]])),
            "labels": torch.from_numpy(self.mask(i)),
        }
        if self.input_ids is not None:
            out["input_ids"] = torch.from_numpy(np.array(self.input_ids[self.sent_offsets[i] + sentence_index]))
        return out

    def __getitem__(self, i: int) -> dict:
        n = int(self.sent_offsets[i + 1] - self.sent_offsets[i])
        j = sentence_index(n, self.seed, self.epoch, i) if self.train else 0
        return self.item(i, j)

    def sentence_items(self):
        """(row, sentence_index) pairs of every sentence, for evaluation."""
        return [(i, j) for i in range(len(self)) for j in range(int(self.sent_offsets[i + 1] - self.sent_offsets[i]))]

    @staticmethod
    def collate(items: list[dict]) -> dict:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}
