"""Rows -> model inputs through the DETRIS processor.

Training (``train=True``): rows with one ``sentence`` each (the trainers wrap the object rows in
``training.data.sentences.OneSentencePerObject``); object rows given directly get one of their sentences from the
same sampler (``sentence_index``), keyed by the collator's call count. Output is the processor's ``BatchFeature``
(``pixel_values``, ``input_ids``, ``labels``, ...).

Evaluation (``train=False``): one sample per expression (a sentence-level row
contributes its ``sentence``; an object-level row contributes all its sentences,
or only the first with ``eval_sentences="first"`` as the official ``validate``),
no labels at 448, and the original-resolution data needed for the official
metric: ``original_sizes`` (B, 2) and ``gt_masks`` (list of bool (H, W) tensors),
plus ``ref_ids`` / ``sent_ids``.
"""

from __future__ import annotations

import numpy as np
import torch

from processing_detris import to_rgb_uint8

from .masks import decode_rle
from .sentences import sentence_index

__all__ = ["DetrisDataCollator", "row_mask", "processor_image"]


def processor_image(value):
    """An ``image`` column value in a form the processor decodes itself (path, encoded bytes, PIL or array)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            return value["path"]
        raise ValueError("image dict has neither 'bytes' nor 'path'")
    return value


def row_mask(row: dict, scale: int = 255) -> np.ndarray:
    """The row's mask at original resolution as uint8 (0 / ``scale``)."""
    m = decode_rle(row["mask"])
    return m * np.uint8(scale) if scale != 1 else m


class DetrisDataCollator:
    """Collate dataset rows (object- or sentence-level) into processor outputs.

    Args:
        processor: a ``DetrisProcessor`` (``processor(images=[...], text=[...], masks=[...], return_tensors="pt")``).
        train: training mode (random sentence + ``labels``) or evaluation mode (every sentence + GT masks).
        seed: seed of the sentence sampler for object rows (``sentence_index(n, seed, call, position)``).
        eval_sentences: ``"all"`` (official test) or ``"first"`` (official validation) for object-level rows.
        mask_scale: value of the foreground in the mask arrays given to the processor (official PNGs: 255).
    """

    def __init__(self, processor, *, train: bool = True, seed: int = 0, eval_sentences: str = "all", mask_scale: int = 255):
        if eval_sentences not in ("all", "first"):
            raise ValueError(f"eval_sentences is {eval_sentences!r}, expected 'all' or 'first'")
        self.processor = processor
        self.train = train
        self.seed = int(seed)
        self.eval_sentences = eval_sentences
        self.mask_scale = mask_scale
        self.calls = 0

    def choose_sentence(self, row: dict, position: int) -> str:
        if "sentence" in row and "sentences" not in row:
            return row["sentence"]
        sents = row["sentences"]
        if not sents:
            raise ValueError(f"ref_id={row.get('ref_id')} has no sentence; expected at least one")
        return sents[sentence_index(len(sents), self.seed, self.calls, position)]

    # -- collation ----------------------------------------------------------------------------
    def __call__(self, rows: list[dict]):
        if self.train:
            return self._train(rows)
        return self._eval(rows)

    def _call_processor(self, rows, **kwargs):
        try:
            return self.processor(return_tensors="pt", **kwargs)
        except ValueError as exc:
            raise ValueError(f"{exc} (batch ref_ids {[r.get('ref_id') for r in rows]})") from exc

    def _train(self, rows):
        images = [processor_image(r["image"]) for r in rows]
        texts = [self.choose_sentence(r, k) for k, r in enumerate(rows)]
        self.calls += 1
        masks = [row_mask(r, self.mask_scale) for r in rows]
        return self._call_processor(rows, images=images, text=texts, masks=masks)

    def _eval(self, rows):
        samples = []  # (row, sentence, sent_id)
        for r in rows:
            if "sentence" in r and "sentences" not in r:
                samples.append((r, r["sentence"], r.get("sent_id", -1)))
            else:
                n = len(r["sentences"]) if self.eval_sentences == "all" else 1
                ids = r.get("sent_ids") or list(range(len(r["sentences"])))
                samples.extend((r, r["sentences"][j], ids[j]) for j in range(n))
        decoded = {}
        images, gts = [], []
        for r, _, _ in samples:
            key = id(r)
            if key not in decoded:
                decoded[key] = (to_rgb_uint8(processor_image(r["image"])), torch.from_numpy(decode_rle(r["mask"]).astype(bool)))
            images.append(decoded[key][0])
            gts.append(decoded[key][1])
        rows_ = [r for r, _, _ in samples]
        out = self._call_processor(rows_, images=images, text=[s for _, s, _ in samples])
        if "original_sizes" not in out:
            out["original_sizes"] = torch.tensor([im.shape[:2] for im in images], dtype=torch.long)
        out["gt_masks"] = gts
        out["ref_ids"] = torch.tensor([int(r.get("ref_id", -1)) for r, _, _ in samples], dtype=torch.long)
        out["sent_ids"] = torch.tensor([int(sid) for _, _, sid in samples], dtype=torch.long)
        return out
