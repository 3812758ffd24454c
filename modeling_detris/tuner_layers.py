"""PEFT tuner layers that hold the DETRIS adapters.

Both layers wrap the `mlp` module of a backbone block, the way LoRA wraps a `Linear`: the frozen MLP stays as
`base_layer`, and every adapter lives in a `ModuleDict` keyed by adapter name. The standalone model
(`DetrisForReferringSegmentation` with `config.adapters_in_model=True`) and the PEFT workflow build the same layers,
so both save the same keys, e.g.

    vision_model.encoder.layer.1.mlp.base_layer.fc1.weight
    vision_model.encoder.layer.1.mlp.detris_dense_aligner.default.down_proj.weight
    text_model.text_model.encoder.layers.1.mlp.detris_text_adapter.default.dense_moc.branch1.bn.running_mean

Side inputs (not modelled by PEFT):
- `DenseAlignerLayer` needs the text encoder's final word features. The DETRIS forward hands them over explicitly
  with `set_word_features` before running the vision encoder. They stay until the next forward, so activation
  checkpointing can re-run the layer during backward.
- `TextAdapterLayer` needs the block's post-attention residual stream, which is the *input* of the sibling
  `layer_norm2` (the MLP only sees its output). A forward pre-hook on that LayerNorm hands it over; the hook is
  owned by the layer and removed by `detach_stream_source()` (called on unload / delete).
"""

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .adapters import DenseAligner, TextAdapter


class _DetrisMlpTunerLayer(nn.Module, BaseTunerLayer):
    """Shared behaviour: wrap an MLP, sum `scale * adapter(...)` of the active adapters onto its output."""

    adapter_attr = ""  # name of the ModuleDict holding the adapters
    other_param_names = ("detris_scale", "detris_adapter_kwargs")

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.detris_scale: dict[str, float] = {}
        self.detris_adapter_kwargs: dict[str, dict] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features = base_layer.fc1.in_features
        self.out_features = base_layer.fc2.out_features

    def _build_adapter(self, **kwargs) -> nn.Module:
        raise NotImplementedError

    def _get_base_layer_device_and_dtype(self, base_layer):
        # An MLP has no `weight` of its own: new adapters follow the device and dtype of its first linear layer.
        weight = self.get_base_layer().fc1.weight
        return weight.device, weight.dtype

    def update_layer(self, adapter_name: str, scale: float, init_mode: str = "official", inference_mode: bool = False, **kwargs):
        """Add (or replace) adapter `adapter_name`; `kwargs` are the adapter module's constructor arguments."""
        adapter = self._build_adapter(**kwargs)
        adapter.reset_parameters(init_mode)
        getattr(self, self.adapter_attr)[adapter_name] = adapter
        self.detris_scale[adapter_name] = float(scale)
        self.detris_adapter_kwargs[adapter_name] = dict(kwargs)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _active_adapter_modules(self):
        adapters = getattr(self, self.adapter_attr)
        return [(name, adapters[name]) for name in self.active_adapters if name in adapters]

    def _add_adapters(self, result: torch.Tensor, adapter_input: torch.Tensor, *extra) -> torch.Tensor:
        for name, adapter in self._active_adapter_modules():
            dtype = next(adapter.parameters()).dtype
            cast = [t.to(dtype) for t in (adapter_input, *extra)]
            result = result + self.detris_scale[name] * adapter(*cast).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError(
            "DETRIS adapters are non-linear (convolutions, BatchNorm, cross-attention) and cannot be merged into the "
            "backbone weights; keep them as separate modules (use `unload()` to remove them)."
        )


class DenseAlignerLayer(_DetrisMlpTunerLayer):
    """Wraps a DINOv2 block's `mlp`: out = mlp(x) + scale * DenseAligner(x, words), with x = norm2(stream). The block's
    LayerScale then multiplies the sum, as in the official code."""

    adapter_layer_names = ("detris_dense_aligner",)
    adapter_attr = "detris_dense_aligner"

    def __init__(self, base_layer: nn.Module, adapter_name: str, scale: float, init_mode: str = "official", **kwargs):
        super().__init__(base_layer)
        self.detris_dense_aligner = nn.ModuleDict({})
        self.word_features: torch.Tensor | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, scale, init_mode, **kwargs)

    def _build_adapter(self, **kwargs) -> nn.Module:
        return DenseAligner(**kwargs)

    def set_word_features(self, word_features: torch.Tensor | None) -> None:
        self.word_features = word_features

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(hidden_states, *args, **kwargs)
        if self.disable_adapters or not self._active_adapter_modules():
            return result
        if self.word_features is None:
            raise RuntimeError(
                "a Dense Aligner ran without word features; run the whole DETRIS model (it passes the text encoder's "
                "output to every DenseAlignerLayer) or call set_word_features() first"
            )
        return self._add_adapters(result, hidden_states, self.word_features)


class TextAdapterLayer(_DetrisMlpTunerLayer):
    """Wraps a CLIP layer's `mlp`: out = mlp(ln2(h)) + scale * TextAdapter(h), with h the post-attention residual
    stream captured from the input of the sibling `layer_norm2`."""

    adapter_layer_names = ("detris_text_adapter",)
    adapter_attr = "detris_text_adapter"

    def __init__(self, base_layer: nn.Module, adapter_name: str, scale: float, init_mode: str = "official", **kwargs):
        super().__init__(base_layer)
        self.detris_text_adapter = nn.ModuleDict({})
        self._stream: torch.Tensor | None = None
        self._stream_hook = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, scale, init_mode, **kwargs)

    def _build_adapter(self, **kwargs) -> nn.Module:
        return TextAdapter(**kwargs)

    def attach_stream_source(self, layer_norm: nn.Module) -> None:
        """Capture the input of `layer_norm` (the block's `layer_norm2`) as the adapter input."""
        self.detach_stream_source()
        self._stream_hook = layer_norm.register_forward_pre_hook(self._capture_stream)

    def detach_stream_source(self) -> None:
        if self._stream_hook is not None:
            self._stream_hook.remove()
            self._stream_hook = None
        self._stream = None

    def _capture_stream(self, module, args):
        self._stream = args[0]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(hidden_states, *args, **kwargs)
        if self.disable_adapters or not self._active_adapter_modules():
            return result
        if self._stream_hook is None or self._stream is None or self._stream.shape != hidden_states.shape:
            raise RuntimeError(
                "a text adapter ran without the residual stream of its block; its layer must be attached to the "
                "block's layer_norm2 with attach_stream_source()"
            )
        return self._add_adapters(result, self._stream)


def dense_aligner_kwargs(config) -> dict:
    """Constructor arguments of the Dense Aligners of a `DetrisConfig`."""
    return dict(
        hidden_size=config.vision_config.hidden_size,
        width=config.vision_adapter_dim,
        text_dim=config.text_config.hidden_size,
        grid_size=config.grid_size,
        num_prefix_tokens=config.num_prefix_tokens,
        attention_dim=config.vision_adapter_attention_dim,
        num_heads=config.vision_adapter_attention_heads,
        dropout=config.vision_adapter_attention_dropout,
        batch_norm_eps=config.adapter_batch_norm_eps,
    )


def text_adapter_kwargs(config) -> dict:
    """Constructor arguments of the text adapters of a `DetrisConfig`."""
    return dict(
        hidden_size=config.text_config.hidden_size,
        width=config.text_adapter_dim,
        batch_norm_eps=config.adapter_batch_norm_eps,
    )


def add_dense_aligner(block: nn.Module, adapter_name: str, scale: float, init_mode: str, **kwargs) -> DenseAlignerLayer:
    """Wrap `block.mlp` of a DINOv2 block (or add another adapter to an existing wrapper)."""
    if isinstance(block.mlp, DenseAlignerLayer):
        block.mlp.update_layer(adapter_name, scale, init_mode, **kwargs)
    else:
        block.mlp = DenseAlignerLayer(block.mlp, adapter_name, scale, init_mode, **kwargs)
    return block.mlp


def add_text_adapter(block: nn.Module, adapter_name: str, scale: float, init_mode: str, **kwargs) -> TextAdapterLayer:
    """Wrap `block.mlp` of a CLIP layer and attach it to the block's `layer_norm2`."""
    if isinstance(block.mlp, TextAdapterLayer):
        block.mlp.update_layer(adapter_name, scale, init_mode, **kwargs)
    else:
        block.mlp = TextAdapterLayer(block.mlp, adapter_name, scale, init_mode, **kwargs)
        block.mlp.attach_stream_source(block.layer_norm2)
    return block.mlp
