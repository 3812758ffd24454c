"""Data for DETRIS: RefCOCO family, custom folders, RefShapes, the collator and the uint8 cache.

The names below are imported from their modules on first use (PEP 562), so `import training.data` (and every
`detris data ... --help`) stays fast.
"""

from importlib import import_module

_HOMES = {
    "DeviceNormalizer": "cache", "LetterboxCache": "cache", "build_letterbox_cache": "cache", "normalization_lut": "cache",
    "DetrisDataCollator": "collate",
    "load_custom_folder": "custom",
    "convert_hub_refer": "hub", "load_refer_from_hub": "hub",
    "binary_mask_to_rle": "masks", "decode_rle": "masks", "segmentation_to_rle": "masks",
    "build_mixed_dataset": "refer", "build_refer_dataset": "refer",
    "RefShapesConfig": "refshapes", "build_refshapes": "refshapes", "text_blind_baseline": "refshapes",
    "SplitSizeWarning": "rows", "check_split_sizes": "rows", "save_atomic": "rows",
    "UnsafePickleError": "safe_pickle", "load_data_pickle": "safe_pickle",
    "CorruptAnnotationError": "schema", "object_features": "schema", "to_sentence_level": "schema",
    "OneSentencePerObject": "sentences", "EpochShuffleSampler": "sentences", "sentence_index": "sentences",
}
__all__ = sorted(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
