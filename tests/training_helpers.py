"""A tiny training setup shared by the training tests: a small DETRIS with the real CLIP vocabulary (so the real
processor can feed it) trained on a few RefShapes scenes."""

TINY_MODEL = dict(
    input_size=56,
    word_len=12,
    vision_config=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, image_size=56),
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
    vision_adapter_layers=[1, 2],
    vision_adapter_dim=16,
    vision_adapter_attention_dim=16,
    vision_adapter_attention_heads=2,
    text_adapter_layers=[1],
    text_adapter_dim=16,
    neck_tap_layers=[0, 1],
    fusion_hidden_size=32,
    neck_num_attention_heads=2,
    decoder_num_layers=1,
    decoder_num_attention_heads=2,
    decoder_ffn_dim=32,
    projector_hidden_size=8,
    vision_adapter_attention_dropout=0.0,
    decoder_dropout=0.0,
)

TINY_RECIPE = dict(
    random_backbones=True,
    model_config=TINY_MODEL,
    dataset="refshapes",
    refshapes=dict(seed=3, image_size=64, n_train=12, n_validation=4, n_test=4),
    train_split="train",
    eval_split="validation",
    eval_sentences="all",
    epochs=2,
    milestones=[1],
    learning_rate=1e-3,
    total_batch_size=4,
    log_every_steps=2,
    log_with=None,
)


def tiny_recipe(output_dir, **overrides):
    from training.recipes import load_training_config

    settings = dict(TINY_RECIPE, output_dir=str(output_dir))
    settings.update(overrides)
    return load_training_config(None, settings)
