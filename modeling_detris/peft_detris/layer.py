"""Tuner layers of the DETRIS PEFT method.

Each layer wraps the `mlp` of a backbone block, the way LoRA wraps a `Linear`: the block's MLP stays as `base_layer`,
and every adapter lives in a `ModuleDict` keyed by adapter name. The adapter modules are the model's own
(`DenseAligner`, `TextAdapter`, initialised by `init_adapter_weights`): there is one implementation of the adapter
math. The blocks of `DetrisForReferringSegmentation` call their MLP with the adapter's second input as an argument
(the word features for a vision block, the post-attention residual stream for a text layer), so a layer needs no
hook and stores nothing between calls:

    vision_model.encoder.layer.1.mlp.base_layer.fc1.weight
    vision_model.encoder.layer.1.mlp.detris_dense_aligner.default.down_proj.weight
    text_model.text_model.encoder.layers.1.mlp.detris_text_adapter.default.dense_moc.branch1.bn.running_mean
"""

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..modeling_detris import DenseAligner, TextAdapter, add_scaled_adapter_output, init_adapter_weights

MERGE_MESSAGE = (
    "DETRIS adapters are non-linear (convolutions, BatchNorm, cross-attention) and cannot be merged into the backbone "
    "weights. To get a standalone DETRIS model with the adapters built in (one checkpoint that "
    "AutoModel.from_pretrained loads), call `modeling_detris.peft_detris.to_standalone_model(peft_model)` and "
    "`save_pretrained` the result; `unload()` removes the adapters and gives back the base model."
)


class DetrisLayer(nn.Module, BaseTunerLayer):
    """Shared behaviour: wrap an MLP, add `scale * adapter(...)` of every active adapter to its output."""

    adapter_class: type[nn.Module] = nn.Module
    other_param_names = ("detris_scale",)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        setattr(self, self.adapter_layer_names[0], nn.ModuleDict({}))  # the adapters, by adapter name
        self.detris_scale: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features = base_layer.fc1.in_features
        self.out_features = base_layer.fc2.out_features
        # Follow the wrapped MLP's mode: adapters injected into a model in eval mode must not update BatchNorm
        # statistics (a fresh nn.Module would start in train mode).
        self.training = base_layer.training

    @property
    def adapters(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_layer_names[0])

    def _get_base_layer_device_and_dtype(self, base_layer):
        # An MLP has no `weight` of its own: new adapters follow the device and dtype of its first linear layer.
        weight = self.get_base_layer().fc1.weight
        return weight.device, weight.dtype

    def update_layer(self, adapter_name: str, peft_config, model_config, inference_mode: bool = False) -> None:
        """Add (or replace) adapter `adapter_name`, built from `peft_config` for a base of configuration
        `model_config` and initialised with `peft_config.adapter_init`."""
        adapter = self.adapter_class.from_settings(peft_config, model_config)
        init_adapter_weights(adapter, peft_config.adapter_init)
        adapter.train(self.training)
        self.adapters[adapter_name] = adapter
        self.detris_scale[adapter_name] = float(peft_config.adapter_scale)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def adapter_inputs(self, hidden_states: torch.Tensor, side_input: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, side_input: torch.Tensor | None = None) -> torch.Tensor:
        result = self.base_layer(hidden_states, side_input)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name in self.adapters:
                inputs = self.adapter_inputs(hidden_states, side_input)
                result = add_scaled_adapter_output(result, self.adapters[name], self.detris_scale[name], *inputs)
        return result

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError(MERGE_MESSAGE)


class DenseAlignerLayer(DetrisLayer):
    """Wraps a DINOv2 block's `mlp`: out = mlp(x) + scale * DenseAligner(x, words), with x = norm2(stream). The block's
    LayerScale then multiplies the sum, as in the official code."""

    adapter_layer_names = ("detris_dense_aligner",)
    adapter_class = DenseAligner

    def adapter_inputs(self, hidden_states, word_features):
        if word_features is None:
            raise ValueError("a Dense Aligner needs the word features: run the whole DETRIS model, which passes them to every vision block")
        return hidden_states, word_features


class TextAdapterLayer(DetrisLayer):
    """Wraps a CLIP layer's `mlp`: out = mlp(ln2(h)) + scale * TextAdapter(h), h the post-attention residual stream."""

    adapter_layer_names = ("detris_text_adapter",)
    adapter_class = TextAdapter

    def adapter_inputs(self, hidden_states, residual_stream):
        if residual_stream is None:
            raise ValueError("a text adapter needs its block's residual stream: run the whole DETRIS model, which passes it to every text MLP")
        return (residual_stream,)


__all__ = ["DenseAlignerLayer", "DetrisLayer", "MERGE_MESSAGE", "TextAdapterLayer"]
