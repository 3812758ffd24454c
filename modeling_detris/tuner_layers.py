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
  `layer_norm2` (the MLP only sees its output). A forward pre-hook on that LayerNorm hands it over. The hook is
  owned by the layer: it exists only while the layer holds at least one adapter (deleting the last adapter removes
  it, adding one back re-attaches it), and `release_side_inputs()` (called by `DetrisAdapterModel.unload()`) removes
  it for good. The hook is found by its id in the LayerNorm's hook table, so it also follows `copy.deepcopy`.
"""

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .adapters import DenseAligner, TextAdapter


class DetrisTunerLayer(nn.Module, BaseTunerLayer):
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
        # Follow the wrapped MLP's mode: adapters injected into a model in eval mode must not update BatchNorm
        # statistics (a fresh nn.Module would start in train mode).
        self.training = base_layer.training

    # Tensors from the last forward that the layer keeps as side inputs (see the module docstring). They belong to
    # that forward, not to the layer: copies and pickles of the model leave them out (a copy made after a training
    # step would otherwise fail on the non-leaf tensor, and a pickle would carry activations).
    transient_attributes: tuple[str, ...] = ()

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self.transient_attributes:
            if name in state:
                state[name] = None
        return state

    def _build_adapter(self, **kwargs) -> nn.Module:
        raise NotImplementedError

    def _get_base_layer_device_and_dtype(self, base_layer):
        # An MLP has no `weight` of its own: new adapters follow the device and dtype of its first linear layer.
        weight = self.get_base_layer().fc1.weight
        return weight.device, weight.dtype

    def update_layer(self, adapter_name: str, scale: float, init_mode: str = "official", inference_mode: bool = False, **kwargs):
        """Add (or replace) adapter `adapter_name`; `kwargs` are the adapter module's constructor arguments."""
        if init_mode not in ("official", "zeros"):
            raise ValueError(f"init_mode must be 'official' or 'zeros', got {init_mode!r}")
        adapter = self._build_adapter(**kwargs)
        adapter.reset_parameters(init_mode)
        adapter.train(self.training)
        getattr(self, self.adapter_attr)[adapter_name] = adapter
        self.detris_scale[adapter_name] = float(scale)
        self.detris_adapter_kwargs[adapter_name] = dict(kwargs)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)
        self._after_adapters_changed()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._after_adapters_changed()

    def _after_adapters_changed(self) -> None:
        """Keep the side inputs in step with the adapters held (see the subclasses)."""

    def release_side_inputs(self) -> None:
        """Drop whatever this layer holds besides its modules (hooks, stashed tensors); called before unloading."""

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
            "backbone weights. To get a standalone DETRIS model with the adapters built in, use "
            "`modeling_detris.peft_detris.to_standalone_model(peft_model)`; `unload()` removes the adapters."
        )


_DetrisMlpTunerLayer = DetrisTunerLayer  # former private name


class DenseAlignerLayer(DetrisTunerLayer):
    """Wraps a DINOv2 block's `mlp`: out = mlp(x) + scale * DenseAligner(x, words), with x = norm2(stream). The block's
    LayerScale then multiplies the sum, as in the official code."""

    adapter_layer_names = ("detris_dense_aligner",)
    adapter_attr = "detris_dense_aligner"
    transient_attributes = ("word_features",)

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, scale: float, init_mode: str = "official", inference_mode: bool = False, **kwargs
    ):
        super().__init__(base_layer)
        self.detris_dense_aligner = nn.ModuleDict({})
        self.word_features: torch.Tensor | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, scale, init_mode, inference_mode=inference_mode, **kwargs)

    def _build_adapter(self, **kwargs) -> nn.Module:
        return DenseAligner(**kwargs)

    def set_word_features(self, word_features: torch.Tensor | None) -> None:
        """The text encoder's final word features [B, L, D_t] that the Dense Aligners attend to in the next forward."""
        self.word_features = word_features

    def _after_adapters_changed(self) -> None:
        if not self.detris_dense_aligner:
            self.word_features = None

    def release_side_inputs(self) -> None:
        self.word_features = None

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


class TextAdapterLayer(DetrisTunerLayer):
    """Wraps a CLIP layer's `mlp`: out = mlp(ln2(h)) + scale * TextAdapter(h), with h the post-attention residual
    stream captured from the input of the sibling `layer_norm2`."""

    adapter_layer_names = ("detris_text_adapter",)
    adapter_attr = "detris_text_adapter"
    transient_attributes = ("_stream",)

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, scale: float, init_mode: str = "official", inference_mode: bool = False, **kwargs
    ):
        super().__init__(base_layer)
        self.detris_text_adapter = nn.ModuleDict({})
        self._stream: torch.Tensor | None = None
        # The LayerNorm whose input is captured, kept outside the module tree (no extra state-dict keys), and the id
        # of the pre-hook in its hook table.
        object.__setattr__(self, "_stream_source", None)
        self._stream_hook_id: int | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, scale, init_mode, inference_mode=inference_mode, **kwargs)

    def _build_adapter(self, **kwargs) -> nn.Module:
        return TextAdapter(**kwargs)

    @property
    def has_stream_hook(self) -> bool:
        source = self._stream_source
        return source is not None and self._stream_hook_id is not None and self._stream_hook_id in source._forward_pre_hooks

    def attach_stream_source(self, layer_norm: nn.Module) -> None:
        """Capture the input of `layer_norm` (the block's `layer_norm2`) as the adapter input."""
        self.detach_stream_source()
        object.__setattr__(self, "_stream_source", layer_norm)
        self._sync_stream_hook()

    def detach_stream_source(self) -> None:
        """Remove the pre-hook and forget the LayerNorm."""
        self._remove_stream_hook()
        object.__setattr__(self, "_stream_source", None)

    def release_side_inputs(self) -> None:
        self.detach_stream_source()

    def _after_adapters_changed(self) -> None:
        self._sync_stream_hook()

    def _sync_stream_hook(self) -> None:
        """The hook exists exactly while there is a LayerNorm to read and at least one adapter to feed."""
        wanted = self._stream_source is not None and len(self.detris_text_adapter) > 0
        if wanted and not self.has_stream_hook:
            handle = self._stream_source.register_forward_pre_hook(self._capture_stream)
            self._stream_hook_id = handle.id
        elif not wanted:
            self._remove_stream_hook()

    def _remove_stream_hook(self) -> None:
        source = self._stream_source
        if source is not None and self._stream_hook_id is not None:
            source._forward_pre_hooks.pop(self._stream_hook_id, None)
        self._stream_hook_id = None
        self._stream = None

    def _capture_stream(self, module, args):
        self._stream = args[0]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(hidden_states, *args, **kwargs)
        if self.disable_adapters or not self._active_adapter_modules():
            return result
        if not self.has_stream_hook or self._stream is None or self._stream.shape != hidden_states.shape:
            raise RuntimeError(
                "a text adapter ran without the residual stream of its block; its layer must be attached to the "
                "block's layer_norm2 with attach_stream_source()"
            )
        return self._add_adapters(result, self._stream)


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
    if block.mlp._stream_source is not block.layer_norm2:
        block.mlp.attach_stream_source(block.layer_norm2)
    return block.mlp
