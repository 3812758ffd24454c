"""`DetrisAdapterModel`: the PEFT tuner that injects the DETRIS adapters into a `DetrisForReferringSegmentation`.

Injection wraps the `mlp` of every configured block in a `DenseAlignerLayer` (vision) or `TextAdapterLayer` (text);
a block already wrapped gets one more adapter in the same layer. The adapters are non-linear, so they cannot be
merged: `merge_and_unload()` raises and points to `to_standalone_model()`, which builds a
`DetrisForReferringSegmentation` with the adapters built in; `split_standalone_model()` is its inverse.

Keys. A standalone model keeps transformers' DINOv2 / CLIP key names and holds its adapters beside the MLP's linear
layers; a PEFT model holds the MLP as `base_layer` and each adapter under its name:

    standalone                                          PEFT model (adapter "default")
    vision_model.encoder.layer.1.mlp.fc1.weight         vision_model.encoder.layer.1.mlp.base_layer.fc1.weight
    vision_model.encoder.layer.1.mlp.dense_aligner.*    vision_model.encoder.layer.1.mlp.detris_dense_aligner.default.*
    text_model.text_model.encoder.layers.1.mlp.text_adapter.*
                                                        text_model.text_model.encoder.layers.1.mlp.detris_text_adapter.default.*
    neck.* / decoder.* / projector.*                    neck.modules_to_save.default.* (the trained copy), neck.original_module.*

`standalone_key` and `is_adapter_key` are the one home of this mapping; the adapter files PEFT writes drop the adapter
name (`...mlp.detris_dense_aligner.down_proj.weight`).
"""

import copy
import re

from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ..modeling_detris import DetrisForReferringSegmentation, DetrisTextMLP, DetrisVisionMLP
from .config import DetrisAdapterConfig, classify_target, target_modules_for
from .layer import MERGE_MESSAGE, DenseAlignerLayer, DetrisLayer, TextAdapterLayer


# attribute of an adapter in a standalone model's MLP -> attribute of the PEFT layer's ModuleDict
STANDALONE_TO_PEFT_ATTRIBUTE = {"dense_aligner": "detris_dense_aligner", "text_adapter": "detris_text_adapter"}
PEFT_TO_STANDALONE_ATTRIBUTE = {peft: standalone for standalone, peft in STANDALONE_TO_PEFT_ATTRIBUTE.items()}
# transformers' `key_mapping` for standalone checkpoints saved before the adapters sat beside the MLP's linears (the
# MLP was a PEFT layer: `...mlp.base_layer.fc1.weight`, `...mlp.detris_dense_aligner.default.*`):
#     AutoModel.from_pretrained(old_dir, key_mapping=LEGACY_KEY_MAPPING)
LEGACY_KEY_MAPPING = {
    r"\.mlp\.base_layer\.": ".mlp.",
    **{rf"\.mlp\.{peft}\.default\.": f".mlp.{standalone}." for standalone, peft in STANDALONE_TO_PEFT_ATTRIBUTE.items()},
}


class DetrisAdapterModel(BaseTuner):
    """PEFT tuner of the DETRIS adapters (`peft_type="DETRIS"`, prefix `"detris_"`). Build it through
    `peft.get_peft_model(model, DetrisAdapterConfig(...))`, `peft.inject_adapter_in_model`, `PeftModel.from_pretrained`
    or transformers' `model.load_adapter`; the base model must be a `DetrisForReferringSegmentation` (usually built
    with `adapters_in_model=False`)."""

    prefix: str = "detris_"
    tuner_layer_cls = DetrisLayer
    target_module_mapping = {}

    # ----- injection ------------------------------------------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: DetrisAdapterConfig, adapter_name: str) -> None:
        check_base_model(model, config)

    def _prepare_adapter_config(self, peft_config, model_config):
        if not isinstance(peft_config, DetrisAdapterConfig):
            raise TypeError(f"DetrisAdapterModel needs a DetrisAdapterConfig, got {type(peft_config).__name__}")
        expected = target_modules_for(peft_config.vision_adapter_layers, peft_config.text_adapter_layers)
        if peft_config.target_modules != expected:
            raise ValueError(f"target_modules must be {expected!r} (derived from the layer lists), got {peft_config.target_modules!r}")
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, parameter_name=None):
        kind = classify_target(current_key)
        if kind is None or target_name != "mlp":
            raise ValueError(
                "the DETRIS adapters wrap the `mlp` of a vision block (vision_model.encoder.layer.<i>.mlp) or a text "
                f"layer (text_model.text_model.encoder.layers.<i>.mlp); got module {current_key!r}"
            )
        layer_cls = DenseAlignerLayer if kind == "vision" else TextAdapterLayer
        if not isinstance(target, layer_cls):
            target = layer_cls(target)
            setattr(parent, target_name, target)
        target.update_layer(adapter_name, peft_config, self.model.config, inference_mode=peft_config.inference_mode)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # peft upcasts bf16/fp16 adapter *parameters* to fp32; the BatchNorm running statistics are buffers and must
        # follow, or batch_norm meets fp32 weights and bf16 statistics.
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        for layer in self.model.modules():
            if isinstance(layer, DetrisLayer) and adapter_name in layer.adapters:
                align_buffer_dtypes(layer.adapters[adapter_name])

    # ----- checkpoint keys ------------------------------------------------------------------------------------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # The adapter name follows the ModuleDict attribute (`...mlp.detris_dense_aligner.default.down_proj.weight`),
        # not the second-to-last component as peft's default assumes. Pure function: used to save and to load.
        return re.sub(rf"(\.{re.escape(cls.prefix)}[^.]*)\.{re.escape(adapter_name)}(?=\.|$)", r"\1", key)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_shapes(model, remapped, adapter_name)
        return remapped

    # ----- unload / delete / merge ----------------------------------------------------------------------------
    def _replace_module(self, parent, child_name, new_module, child) -> None:
        unwrapped = getattr(child, "base_layer", child)
        if not hasattr(new_module, "base_layer") and not hasattr(unwrapped, "weight"):
            # Unloading a DETRIS layer (an MLP) or a `modules_to_save` head (neck / decoder / projector): put the
            # plain module back. peft's version assumes a layer with a `.weight` to re-attach.
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise NotImplementedError(MERGE_MESSAGE)
        return super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def merge_and_unload(self, *args, **kwargs):
        raise NotImplementedError(MERGE_MESSAGE)

    def merge_adapter(self, *args, **kwargs):
        raise NotImplementedError(MERGE_MESSAGE)

    def to_standalone_model(self, adapter_name: str | None = None):
        """See `to_standalone_model`."""
        return to_standalone_model(self, adapter_name)


# ----- the standalone <-> PEFT key mapping --------------------------------------------------------------------
def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key (standalone, PEFT model or PEFT adapter file) belongs to a Dense Aligner or a text
    adapter."""
    parts = set(key.split("."))
    return bool(parts & (set(STANDALONE_TO_PEFT_ATTRIBUTE) | set(PEFT_TO_STANDALONE_ATTRIBUTE)))


def standalone_key(key: str, adapter_name: str, heads_with_copy=frozenset()) -> str | None:
    """The standalone key of a PEFT model's state-dict key for adapter `adapter_name`, or None for a tensor the
    standalone model does not take (another adapter, or the base copy of a head that `adapter_name` trained)."""
    parts = key.split(".")
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        if parts[i + 1] != adapter_name:
            return None
        parts = parts[:i] + parts[i + 2 :]
    elif "original_module" in parts:
        i = parts.index("original_module")
        if ".".join(parts[:i]) in heads_with_copy:
            return None
        parts = parts[:i] + parts[i + 1 :]
    if "base_layer" in parts:
        parts.remove("base_layer")
    for j, part in enumerate(parts[:-1]):
        if part in PEFT_TO_STANDALONE_ATTRIBUTE:
            if parts[j + 1] != adapter_name:
                return None
            parts[j : j + 2] = [PEFT_TO_STANDALONE_ATTRIBUTE[part]]
            break
    return ".".join(parts)


# ----- helpers ------------------------------------------------------------------------------------------------
def check_base_model(model: nn.Module, config: DetrisAdapterConfig) -> None:
    """Refuse a base that is not DETRIS or lacks a configured layer, naming the bad value and the valid range."""
    model_config = getattr(model, "config", None)
    if getattr(model_config, "model_type", None) != "detris":
        raise ValueError(
            "the DETRIS PEFT method needs a DetrisForReferringSegmentation base model (config.model_type 'detris'), got "
            f"{type(model).__name__} with model_type {getattr(model_config, 'model_type', None)!r}"
        )
    for name, width_name, width in (
        ("base_vision_hidden_size", "vision_config.hidden_size", model_config.vision_config.hidden_size),
        ("base_text_hidden_size", "text_config.hidden_size", model_config.text_config.hidden_size),
    ):
        expected = getattr(config, name)
        if expected is None:
            setattr(config, name, width)
        elif expected != width:
            raise ValueError(
                f"these DETRIS adapters were built for a base with {width_name}={expected} ({name} in the adapter "
                f"config), but the base model has {width_name}={width}; load them onto the kind of base they were "
                "trained on"
            )
    for name, depth_name, depth in (
        ("vision_adapter_layers", "vision encoder", model_config.vision_config.num_hidden_layers),
        ("text_adapter_layers", "text encoder", model_config.text_config.num_hidden_layers),
    ):
        bad = [i for i in getattr(config, name) if not 0 <= i < depth]
        if bad:
            raise ValueError(
                f"DetrisAdapterConfig.{name} has {bad}, but the base model's {depth_name} has {depth} layers "
                f"(expected indices in [0, {depth - 1}])"
            )


def check_adapter_shapes(model: nn.Module, state_dict: dict, adapter_name: str) -> None:
    """Before loading adapter weights: every tensor must fit the adapter built from the config, or the error names
    the key, both shapes and the likely cause."""
    own = model.state_dict()
    bad = []
    for key, value in state_dict.items():
        if f".{adapter_name}." not in key or key not in own or not hasattr(value, "shape"):
            continue
        if tuple(own[key].shape) != tuple(value.shape):
            bad.append(f"{key}: checkpoint {list(value.shape)}, model {list(own[key].shape)}")
    if bad:
        raise ValueError(
            f"{len(bad)} adapter weight(s) do not fit the model ({'; '.join(sorted(bad)[:4])}{'; ...' if len(bad) > 4 else ''}). "
            "The DetrisAdapterConfig (vision_adapter_dim, text_adapter_dim, vision_adapter_attention_dim) or the base "
            "model (hidden sizes) differs from the one the adapter was saved with: load it with its own "
            "adapter_config.json onto the same kind of base model"
        )


def align_buffer_dtypes(module: nn.Module) -> None:
    for owner in module.modules():
        params = list(owner.parameters(recurse=False))
        if not params:
            continue
        dtype = params[0].dtype
        for name, buffer in list(owner.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                setattr(owner, name, buffer.to(dtype))


def unwrap_peft_model(model):
    """(the DETRIS model, its PEFT configs by adapter name, active adapters) of a PeftModel, a DetrisAdapterModel, or
    a DETRIS model with adapters injected by transformers' `load_adapter` / `inject_adapter_in_model`."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        tuner = model.base_model
        return tuner.model, tuner.peft_config, tuner.active_adapters
    if isinstance(model, DetrisAdapterModel):
        return model.model, model.peft_config, model.active_adapters
    configs = getattr(model, "peft_config", None)
    if not configs:
        raise ValueError(
            f"{type(model).__name__} holds no PEFT adapters (no peft_config); a DETRIS model with built-in adapters is "
            "already standalone"
        )
    active = next((list(m.active_adapters) for m in model.modules() if isinstance(m, DetrisLayer)), [])
    return model, configs, active


def to_standalone_model(model, adapter_name: str | None = None):
    """A `DetrisForReferringSegmentation` with adapter `adapter_name` built in (`adapters_in_model=True`), its head
    taken from the adapter's `modules_to_save` copy when it has one. Its outputs equal those of the PEFT model with
    that adapter active, and `save_pretrained` gives one checkpoint that `AutoModel.from_pretrained` loads. This is
    the replacement for `merge_and_unload`, which the non-linear DETRIS adapters cannot support.

    `model` is a `PeftModel`, a `DetrisAdapterModel`, or a DETRIS model with adapters loaded by transformers'
    `load_adapter`; `adapter_name` defaults to the single active adapter."""
    from transformers.initialization import no_init_weights

    detris, configs, active = unwrap_peft_model(model)
    if adapter_name is None:
        if len(active) != 1:
            raise ValueError(f"pass adapter_name: the model has {len(active)} active adapters {active}, expected exactly 1")
        adapter_name = active[0]
    if adapter_name not in configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {sorted(configs)}")
    peft_config = configs[adapter_name]
    if not isinstance(peft_config, DetrisAdapterConfig):
        raise TypeError(f"adapter {adapter_name!r} is a {type(peft_config).__name__}, not a DetrisAdapterConfig")
    if any(isinstance(m, (DetrisVisionMLP, DetrisTextMLP)) and m.adapter is not None for m in detris.modules()):
        raise ValueError("the base model has built-in adapters (adapters_in_model=True); expected a bare base")

    config = copy.deepcopy(detris.config)
    for name, value in peft_config.to_model_config_kwargs().items():
        setattr(config, name, value)
    config.adapters_in_model = True
    config.check_detris_settings()
    parameter = next(detris.parameters())
    with no_init_weights():  # every tensor is loaded (strictly) right below
        standalone = DetrisForReferringSegmentation(config)

    heads_with_copy = {
        name
        for name, module in detris.named_modules()
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save
    }
    mapped = {}
    for key, value in detris.state_dict().items():
        new_key = standalone_key(key, adapter_name, heads_with_copy)
        if new_key is not None:
            mapped[new_key] = value
    wanted = standalone.state_dict()
    missing, unexpected = sorted(set(wanted) - set(mapped)), sorted(set(mapped) - set(wanted))
    if missing or unexpected:
        raise RuntimeError(
            f"cannot map adapter {adapter_name!r} onto a standalone DETRIS: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    standalone.load_state_dict(mapped, strict=True)
    standalone.to(device=parameter.device, dtype=parameter.dtype)
    standalone.freeze_backbones()
    standalone.train(detris.training)
    return standalone


def split_standalone_model(model, base_dir=None, modules_to_save=("neck", "decoder", "projector"),
                           base_model_name_or_path=None):
    """The inverse of `to_standalone_model`: from a DETRIS with built-in adapters, save the bare base
    (`adapters_in_model=False`: frozen backbones + head) to `base_dir` and return a `PeftModel` over it that holds
    those adapters as adapter "default" (and the head as `modules_to_save`, unless `modules_to_save` is empty), its
    `base_model_name_or_path` pointing at `base_dir`. Outputs are unchanged; `peft_model.save_pretrained(dir)` then
    writes the small adapter-only folder that `AutoModel.from_pretrained(dir)` loads.

    `base_dir=None` saves no base (e.g. a further checkpoint of a release whose base is already saved); the adapter
    then names `base_model_name_or_path`. The adapter config records the model's `word_len`."""
    from peft import get_peft_model
    from transformers.initialization import no_init_weights

    if not model.config.adapters_in_model:
        raise ValueError("the model has no built-in adapters (adapters_in_model=False); nothing to split")
    config = copy.deepcopy(model.config)
    config.adapters_in_model = False
    with no_init_weights():  # every tensor is loaded (strictly) right below
        base = DetrisForReferringSegmentation(config)
    adapter_keys = set(model.adapter_state_dict())
    base.load_state_dict({k: v for k, v in model.state_dict().items() if k not in adapter_keys}, strict=True)
    base.to(dtype=next(model.parameters()).dtype).train(model.training)
    if base_dir is not None:
        base.save_pretrained(base_dir)  # before PEFT wraps the head in place
    peft_config = DetrisAdapterConfig.from_model_config(
        model.config, modules_to_save=list(modules_to_save) or None, word_len=model.config.word_len
    )
    name = base_model_name_or_path if base_model_name_or_path is not None else base_dir
    if name is not None:
        base.name_or_path = str(name)  # get_peft_model takes the adapter's base_model_name_or_path from here
    peft_model = get_peft_model(base, peft_config)
    for layer_name, layer in peft_model.base_model.model.named_modules():
        if isinstance(layer, DetrisLayer):
            layer.adapters["default"].load_state_dict(model.get_submodule(layer_name).adapter.state_dict())
    return peft_model


__all__ = [
    "LEGACY_KEY_MAPPING",
    "DetrisAdapterModel",
    "MERGE_MESSAGE",
    "is_adapter_key",
    "split_standalone_model",
    "standalone_key",
    "to_standalone_model",
]
