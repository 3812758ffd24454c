"""Shared fixtures: tiny DETRIS configs and, once per session, the official-layout stand-in checkpoint converted to
a transformers folder."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"
sys.path.insert(0, str(GOLDEN))

import modeling_detris  # noqa: E402,F401  (registers the Auto classes)
from configuration_detris import DetrisConfig  # noqa: E402


def tiny_config(**overrides) -> DetrisConfig:
    """A DETRIS small enough to run in milliseconds: 56 px input (4x4 grid of 14 px patches), width 32."""
    settings = dict(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=70,
            num_register_tokens=4, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu",
        ),
        text_config=dict(
            vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=24,
            bos_token_id=198, eos_token_id=199, pad_token_id=0,
        ),
        vision_adapter_layers=[1, 3], vision_adapter_dim=16, vision_adapter_attention_dim=16,
        vision_adapter_attention_heads=2, text_adapter_layers=[1, 2], text_adapter_dim=16,
        neck_tap_layers=[1, 2], fusion_hidden_size=32, neck_num_attention_heads=2, decoder_num_layers=2,
        decoder_num_attention_heads=2, decoder_ffn_dim=32, projector_hidden_size=8, word_len=7, input_size=56,
    )
    settings.update(overrides)
    return DetrisConfig(**settings)


def tiny_inputs(config: DetrisConfig, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    size = config.input_size
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    input_ids = torch.zeros(batch, config.word_len, dtype=torch.long)
    for row in range(batch):
        length = 2 + row % (config.word_len - 2)
        input_ids[row, 0] = config.text_config.bos_token_id
        input_ids[row, 1:length] = torch.randint(1, config.text_config.bos_token_id, (length - 1,), generator=generator)
        input_ids[row, length] = config.text_config.eos_token_id
    labels = (torch.rand(batch, size, size, generator=generator) > 0.5).float()
    return pixel_values, input_ids, labels


@pytest.fixture(scope="session")
def golden_outputs():
    with np.load(GOLDEN / "model_base_seed0.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def golden_pixel_values():
    return torch.from_numpy(np.random.RandomState(1234).standard_normal((2, 3, 448, 448)).astype(np.float32))


@pytest.fixture(scope="session")
def official_base_checkpoint(tmp_path_factory):
    """The stand-in DETRIS-B weights (seed 0) saved the way the official release is: {"state_dict": {"module."+k}}."""
    from original_weights import make_state_dict, read_keys

    state = make_state_dict(read_keys(GOLDEN / "keys_base.tsv"), seed=0)
    path = tmp_path_factory.mktemp("official") / "base_refcoco.pth"
    torch.save({"epoch": 50, "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    return path


@pytest.fixture(scope="session")
def converted_base_dir(official_base_checkpoint, tmp_path_factory):
    """`detris convert` run once per session on the stand-in checkpoint."""
    from training.cli import main

    output = tmp_path_factory.mktemp("converted") / "detris-base-refcoco"
    assert main(["convert", "--checkpoint", str(official_base_checkpoint), "--variant", "base", "--output", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~50x faster on one thread when the (2-core) machine is shared: intra-op threads of
    millisecond kernels mostly wait for each other. Restored afterwards for the other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
