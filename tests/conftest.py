import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "examples"))

from sparsec.families import detect_family  # noqa: E402
from sparsec.models import build_model, builtin_config  # noqa: E402

MODELS = ("tiny-qwen2", "tiny-llama", "tiny-janus")


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    return build_model(builtin_config(name), seed=seed)


def make_inputs(model: torch.nn.Module, batch: int, seq: int, seed: int = 0, pad_left: int = 0) -> dict:
    """Family example inputs; the first sample gets `pad_left` masked (left-padded) positions."""
    inputs = detect_family(model).example_inputs(model, batch, seq, seed=seed)
    if pad_left:
        inputs["attention_mask"][0, :pad_left] = 0
    return inputs


@pytest.fixture(scope="session")
def captured():
    """Session cache of (model, program) per built-in name. Do not mutate these programs."""
    from sparsec import capture

    cache = {}

    def get(name: str):
        if name not in cache:
            model = make_model(name)
            cache[name] = (model, capture(model, make_inputs(model, 2, 16)))
        return cache[name]

    return get


class QwenImageStep(torch.nn.Module):
    """One denoising step of a diffusers QwenImage MMDiT at a fixed latent grid (`img_shapes` is not a tensor)."""

    def __init__(self, transformer, frames: int = 1, height: int = 4, width: int = 4):
        super().__init__()
        self.transformer = transformer
        self.img_shapes = [(frames, height, width)]

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep):
        return self.transformer(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_mask=encoder_hidden_states_mask, timestep=timestep,
            img_shapes=self.img_shapes * hidden_states.shape[0], return_dict=False,
        )[0]


def make_qwenimage(seed: int = 0):
    """A tiny QwenImageTransformer2DModel (random weights) and example inputs for a 4x4 latent grid."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
    ).eval()
    return QwenImageStep(transformer)


def qwenimage_inputs(batch: int, text: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 16, 16, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text, 24, generator=gen),
        "encoder_hidden_states_mask": torch.ones(batch, text, dtype=torch.long),
        "timestep": torch.rand(batch, generator=gen),
    }
