"""Configuration of the DETRIS PEFT method (`DetrisAdapterConfig`) and its `peft_type` (`DetrisPeftType.DETRIS`).

The adapters always sit on the MLPs of numbered backbone blocks, so a config names *layers*, not modules:
`vision_adapter_layers` (Dense Aligners on `vision_model.encoder.layer.<i>.mlp`) and `text_adapter_layers` (text
adapters on `text_model.text_model.encoder.layers.<i>.mlp`). `target_modules` is derived from them (one regex); it
is stored in `adapter_config.json` like any PEFT method's, and a value that disagrees with the layer lists is refused.
"""

import copy
import enum
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

VISION_LAYERS_PATH = "vision_model.encoder.layer"
TEXT_LAYERS_PATH = "text_model.text_model.encoder.layers"
ADAPTER_INIT_MODES = ("official", "zeros")
DEFAULT_MODULES_TO_SAVE = ("neck", "decoder", "projector")

# The DetrisConfig fields that describe the adapters; the same names are used here.
ADAPTER_FIELDS = (
    "vision_adapter_layers",
    "vision_adapter_dim",
    "vision_adapter_attention_dim",
    "vision_adapter_attention_heads",
    "vision_adapter_attention_dropout",
    "text_adapter_layers",
    "text_adapter_dim",
    "adapter_scale",
    "adapter_init",
    "adapter_batch_norm_eps",
)


class DetrisPeftType(str, enum.Enum):
    """The PEFT type of the DETRIS adapters. peft's own `PeftType` is closed, so the method registers this member in
    peft's mappings instead (see `modeling_detris.peft_detris.register_detris_peft`). Its lower-cased value is the
    tuner prefix without the underscore, which transformers' `delete_adapter` relies on."""

    DETRIS = "DETRIS"


def _layer_alternatives(layers) -> str:
    return "|".join(str(i) for i in layers)


def target_modules_for(vision_adapter_layers, text_adapter_layers) -> str:
    """The regex (full match, from the root of a `DetrisForReferringSegmentation`) of the MLPs to wrap."""
    parts = []
    if vision_adapter_layers:
        parts.append(rf"{re.escape(VISION_LAYERS_PATH)}\.(?:{_layer_alternatives(vision_adapter_layers)})\.mlp")
    if text_adapter_layers:
        parts.append(rf"{re.escape(TEXT_LAYERS_PATH)}\.(?:{_layer_alternatives(text_adapter_layers)})\.mlp")
    return "|".join(parts)


VISION_KEY = re.compile(rf"{re.escape(VISION_LAYERS_PATH)}\.(\d+)\.mlp")
TEXT_KEY = re.compile(rf"{re.escape(TEXT_LAYERS_PATH)}\.(\d+)\.mlp")


def classify_target(key: str) -> tuple[str, int] | None:
    """`("vision", i)` or `("text", i)` for an adapted MLP's module name, None for anything else."""
    for kind, pattern in (("vision", VISION_KEY), ("text", TEXT_KEY)):
        match = pattern.fullmatch(key)
        if match:
            return kind, int(match.group(1))
    return None


def _adapter_presets() -> dict[str, dict]:
    from configuration_detris.configuration_detris import PRESETS

    keys = ("vision_adapter_layers", "vision_adapter_dim", "text_adapter_layers", "text_adapter_dim")
    return {name: {k: copy.deepcopy(preset[k]) for k in keys} for name, preset in PRESETS.items()}


@dataclass
class DetrisAdapterConfig(PeftConfig):
    """Configuration of the DETRIS adapters as a PEFT method (`peft_type="DETRIS"`).

    The defaults are DETRIS-B's adapters (2,715,696 parameters on a DINOv2-B + CLIP-B/16 base); use
    `DetrisAdapterConfig.from_preset("base" | "large" | "large-mixed")` for the official B / L / L* sets, or
    `DetrisAdapterConfig.from_model_config(detris_config)` for the adapters a `DetrisConfig` describes.

    Args:
        vision_adapter_layers (`list[int]`): 0-based DINOv2 blocks whose MLP gets a Dense Aligner. May be empty.
        vision_adapter_dim (`int`): Dense Aligner bottleneck width (a positive multiple of 16).
        vision_adapter_attention_dim (`int`): width of the Dense Aligner's cross-attention to the words.
        vision_adapter_attention_heads (`int`): heads of that cross-attention.
        vision_adapter_attention_dropout (`float`): dropout on its attention weights in training.
        text_adapter_layers (`list[int]`): 0-based CLIP text layers that get a text adapter. May be empty.
        text_adapter_dim (`int`): text adapter bottleneck width (a positive multiple of 16).
        adapter_scale (`float`): factor on every adapter output (0.2, as in DETRIS).
        adapter_init (`str`): `"official"` (default) or `"zeros"`. `"official"` is the initialisation the published
            DETRIS models were trained from, so a fresh adapter set reproduces the paper's recipe; the adapters are
            active from the first step. `"zeros"` zeroes each adapter's output projection, so `get_peft_model` leaves
            the base model's outputs unchanged at step 0 (the usual PEFT `init_weights=True` convention).
        adapter_batch_norm_eps (`float`): eps of the adapters' BatchNorms.
        target_modules (`str`, derived): regex of the wrapped MLPs, computed from the two layer lists. Passing a
            different value is an error (change the layer lists instead).
        base_vision_hidden_size (`int`, filled in): the DINOv2 width the adapters were built for, and
        base_text_hidden_size (`int`, filled in): the CLIP text width; both are set from the base model when the
            adapters are injected and saved with them, so a saved adapter set refuses a base of another size (say a
            DETRIS-B adapter on a DETRIS-L base) with a clear message instead of a shape error.
        word_len (`int`, *optional*): the text length the adapters were trained with (17; 22 for G-Ref umd). A
            base model serves adapters of several datasets, but the Dense Aligners attend to every token, padding
            included, so the text length is part of what an adapter learned: while this adapter is active the model
            expects inputs of this length instead of the base's `config.word_len`. `None` (default): the base's.
            `split_standalone_model` (and so `detris convert --split-adapters`) records the model's.
        modules_to_save (`list[str]`): extra modules trained and saved with the adapter. Default: the DETRIS head,
            `["neck", "decoder", "projector"]`, which every DETRIS adapter set is trained with. `None` keeps the
            base model's head frozen and out of the adapter file.
    """

    vision_adapter_layers: list[int] = field(default_factory=lambda: [1, 3, 5, 7, 9, 11])
    vision_adapter_dim: int = 128
    vision_adapter_attention_dim: int = 128
    vision_adapter_attention_heads: int = 8
    vision_adapter_attention_dropout: float = 0.1
    text_adapter_layers: list[int] = field(default_factory=lambda: [1, 3, 5, 7, 9, 11])
    text_adapter_dim: int = 64
    adapter_scale: float = 0.2
    adapter_init: str = "official"
    adapter_batch_norm_eps: float = 1e-3
    base_vision_hidden_size: Optional[int] = None
    base_text_hidden_size: Optional[int] = None
    word_len: Optional[int] = None
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Derived from vision_adapter_layers / text_adapter_layers; leave it None."}
    )
    exclude_modules: Optional[Union[list[str], str]] = None
    target_parameters: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = field(default_factory=lambda: list(DEFAULT_MODULES_TO_SAVE))
    bias: str = "none"

    def __post_init__(self):
        super().__post_init__()
        # JSON gives back a plain string: always (re)set the Enum member (transformers calls `.value.lower()`).
        self.peft_type = DetrisPeftType.DETRIS
        self.vision_adapter_layers = _int_list("vision_adapter_layers", self.vision_adapter_layers)
        self.text_adapter_layers = _int_list("text_adapter_layers", self.text_adapter_layers)
        if not self.vision_adapter_layers and not self.text_adapter_layers:
            raise ValueError("DetrisAdapterConfig needs at least one adapter layer; got empty vision_adapter_layers and text_adapter_layers")
        for name in ("vision_adapter_dim", "text_adapter_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value % 16:
                raise ValueError(f"{name} must be a positive multiple of 16 (the dense branches use a/2, a/4, a/16), got {value!r}")
        heads, width = self.vision_adapter_attention_heads, self.vision_adapter_attention_dim
        if heads < 1 or width < 1 or width % heads:
            raise ValueError(f"vision_adapter_attention_dim ({width}) must be a positive multiple of vision_adapter_attention_heads ({heads})")
        if not 0.0 <= self.vision_adapter_attention_dropout < 1.0:
            raise ValueError(f"vision_adapter_attention_dropout must be in [0, 1), got {self.vision_adapter_attention_dropout}")
        if self.adapter_init not in ADAPTER_INIT_MODES:
            raise ValueError(f"adapter_init must be one of {ADAPTER_INIT_MODES}, got {self.adapter_init!r}")
        if self.adapter_batch_norm_eps <= 0:
            raise ValueError(f"adapter_batch_norm_eps must be > 0, got {self.adapter_batch_norm_eps}")
        if self.word_len is not None and (isinstance(self.word_len, bool) or not isinstance(self.word_len, int) or self.word_len < 2):
            raise ValueError(f"word_len must be None or an integer >= 2 (SOT + EOT), got {self.word_len!r}; DETRIS uses 17 or 22")
        if self.bias != "none":
            raise ValueError(f"DETRIS adapters have no bias option: bias must be 'none', got {self.bias!r}")
        for name in ("target_parameters", "layers_to_transform", "layers_pattern"):
            if getattr(self, name):
                raise ValueError(
                    f"DetrisAdapterConfig does not use {name} (got {getattr(self, name)!r}); choose the adapted blocks with "
                    "vision_adapter_layers / text_adapter_layers"
                )
        expected = target_modules_for(self.vision_adapter_layers, self.text_adapter_layers)
        if self.target_modules is None:
            self.target_modules = expected
        elif self.target_modules != expected:
            raise ValueError(
                f"target_modules is derived from the layer lists: expected {expected!r}, got {self.target_modules!r}; "
                "leave it None and set vision_adapter_layers / text_adapter_layers instead"
            )
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    # ----- constructors ---------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DetrisAdapterConfig":
        """The adapters of an official configuration: `"base"` (DETRIS-B), `"large"` (DETRIS-L) or `"large-mixed"`
        (DETRIS-L*), also under the aliases `"detris-b"`, `"detris-l"`, `"detris-l*"`; any field can be overridden."""
        from configuration_detris.configuration_detris import PRESET_ALIASES

        presets = _adapter_presets()
        key = PRESET_ALIASES.get(name.lower(), name.lower())
        if key not in presets:
            raise ValueError(f"unknown DETRIS preset {name!r}; expected one of {sorted(presets) + sorted(PRESET_ALIASES)}")
        return cls(**{**presets[key], **overrides})

    @classmethod
    def from_model_config(cls, detris_config, **overrides) -> "DetrisAdapterConfig":
        """The adapters described by a `DetrisConfig` (its adapter fields), e.g. to train a new adapter set of the same
        shape as a released model's on a base built with `adapters_in_model=False`."""
        settings = {name: copy.deepcopy(getattr(detris_config, name)) for name in ADAPTER_FIELDS}
        return cls(**{**settings, **overrides})

    def to_model_config_kwargs(self) -> dict:
        """The `DetrisConfig` fields that build these adapters into a standalone model (with `word_len` when set)."""
        kwargs = {name: copy.deepcopy(getattr(self, name)) for name in ADAPTER_FIELDS}
        if self.word_len is not None:
            kwargs["word_len"] = self.word_len
        return kwargs


def _int_list(name, values) -> list[int]:
    if isinstance(values, int):
        values = [values]
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a list of non-negative block indices, got {values!r}")
        out.append(int(value))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} lists a block twice: {out}")
    return sorted(out)


def adapter_presets() -> dict[str, dict]:
    """The adapter fields of the official presets, by preset name."""
    return _adapter_presets()


__all__ = ["DetrisAdapterConfig", "DetrisPeftType", "adapter_presets", "classify_target", "target_modules_for"]
