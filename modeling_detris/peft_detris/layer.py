"""Tuner layers of the DETRIS PEFT method. They live in `modeling_detris.tuner_layers`, which the model itself also
uses for its built-in adapters; this module re-exports them so the package reads like peft's tuners."""

from ..tuner_layers import DenseAlignerLayer, DetrisTunerLayer, TextAdapterLayer, add_dense_aligner, add_text_adapter

__all__ = ["DenseAlignerLayer", "DetrisTunerLayer", "TextAdapterLayer", "add_dense_aligner", "add_text_adapter"]
