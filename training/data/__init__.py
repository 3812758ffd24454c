"""Data for DETRIS: RefCOCO family, custom folders, RefShapes, collators and the uint8 cache (issue #5)."""

from .cache import DeviceNormalizer, LetterboxCache, build_letterbox_cache, normalization_lut
from .collate import DetrisDataCollator
from .custom import load_custom_folder
from .hub import HUB_REPOS, convert_hub_refer, load_refer_from_hub
from .masks import binary_mask_to_rle, decode_rle, segmentation_to_rle
from .refer import build_mixed_dataset, build_refer_dataset
from .refshapes import RefShapesConfig, build_refshapes, text_blind_baseline
from .rows import OFFICIAL_REF_COUNTS, SplitSizeWarning, check_split_sizes, save_atomic
from .safe_pickle import UnsafePickleError, load_data_pickle
from .schema import CorruptAnnotationError, object_features, to_sentence_level

__all__ = [
    "build_refer_dataset", "build_mixed_dataset", "load_refer_from_hub", "convert_hub_refer", "HUB_REPOS",
    "load_custom_folder", "to_sentence_level", "object_features", "CorruptAnnotationError",
    "load_data_pickle", "UnsafePickleError", "check_split_sizes", "OFFICIAL_REF_COUNTS", "SplitSizeWarning",
    "save_atomic", "segmentation_to_rle", "binary_mask_to_rle", "decode_rle",
    "DetrisDataCollator", "build_letterbox_cache", "LetterboxCache", "DeviceNormalizer", "normalization_lut",
    "RefShapesConfig", "build_refshapes", "text_blind_baseline",
]
