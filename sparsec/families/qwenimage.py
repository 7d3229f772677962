"""Diffusion transformers (diffusers) as capturable programs: Qwen-Image's MMDiT denoising step.

A diffusers `QwenImageTransformer2DModel` cannot be captured as is: besides tensors, its forward takes
`img_shapes`, a Python list of `(frames, height, width)` latent grids that sizes the rotary table and would
be frozen into the program anyway (torch.export bakes non-tensor arguments in as constants).
`QwenImageStep` therefore fixes the grid when the model is wrapped and leaves a forward of tensors only:
one denoising step, `(latent patches, prompt embeddings, prompt mask, timestep) -> predicted velocity`.
A program captured from it serves that one image size; wrap again for another size.

What stays dynamic: the batch. The text length is fixed at capture too, because diffusers slices its
rotary table with `int(text_length)`; capture with the prompt length you deploy (pipelines pad prompts).

diffusers is an optional dependency (`pip install diffusers`); only `tiny_qwenimage` imports it: the family
recognises a model by the class name `QwenImageTransformer2DModel` in its tree, without importing diffusers.

Example::
    from diffusers import QwenImageTransformer2DModel
    step = QwenImageStep(QwenImageTransformer2DModel.from_pretrained(...), height=64, width=64)
    program = sparsec.capture(step, step.example_inputs(batch=2, text=77))   # batch stays dynamic
"""

from __future__ import annotations

import torch

from sparsec.errors import SparsecError
from sparsec.families.base import Family
from sparsec.ir.tags import TagRule

# A tiny QwenImageTransformer2DModel: 2 blocks, 2 heads of 16 (inner dim 32), rotary axes 4 + 6 + 6 = 16,
# 16 input channels (4 latent channels x 2x2 patch), prompt embeddings of width 24.
TINY_QWENIMAGE_CONFIG: dict = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=(4, 6, 6),
)


class QwenImageStep(torch.nn.Module):
    """One denoising step of a diffusers `QwenImageTransformer2DModel` at a latent grid fixed at wrap time.

    Args:
        transformer: the diffusers model (kept as the submodule `transformer`, so module paths read
            `transformer.transformer_blocks.0.img_mlp`).
        frames, height, width: the latent grid in patches (Qwen-Image: `1, H // 16, W // 16` for an H x W
            image: VAE factor 8, then 2x2 patches), so `hidden_states` has `frames * height * width` tokens.

    The grid is a Python value (`img_shapes`), not an input: it becomes part of the captured program. All
    samples of a batch share it, so it is passed as one entry: diffusers' rotary embedding reads only the
    first entry of `img_shapes`, and a list as long as the batch would make the batch a Python int and fix it
    at capture (`[grid] * batch` computes the same step; the tests check that).

    Example::
        step = QwenImageStep(transformer, height=4, width=4)
        step(**step.example_inputs(batch=2, text=7)).shape    # [batch, 16 tokens, patch*patch*out_channels]
    """

    def __init__(self, transformer: torch.nn.Module, frames: int = 1, height: int = 4, width: int = 4) -> None:
        super().__init__()
        if getattr(getattr(transformer, "config", None), "zero_cond_t", False):
            raise SparsecError(
                "QwenImageStep wraps text-to-image transformers; this one has zero_cond_t=True "
                "(an image-edit model, whose img_shapes list several images per sample)"
            )
        self.transformer = transformer
        self.grid = (int(frames), int(height), int(width))

    @property
    def image_tokens(self) -> int:
        """Length of the latent token sequence (`hidden_states.shape[1]`)."""
        frames, height, width = self.grid
        return frames * height * width

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor,
        timestep: torch.Tensor,
    ) -> torch.Tensor:
        return self.transformer(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            timestep=timestep,
            img_shapes=[self.grid],
            return_dict=False,
        )[0]

    def example_inputs(self, batch: int, text: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random valid step inputs: `batch` samples, prompts of `text` tokens (all valid), timesteps in [0, 1)."""
        config = self.transformer.config
        return qwenimage_step_inputs(
            batch,
            text,
            image_tokens=self.image_tokens,
            in_channels=config.in_channels,
            text_dim=config.joint_attention_dim,
            seed=seed,
        )


def qwenimage_step_inputs(
    batch: int, text: int, *, image_tokens: int, in_channels: int, text_dim: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random inputs of a `QwenImageStep` with the given sizes (seeded; the prompt mask is all ones)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, image_tokens, in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text, text_dim, generator=gen),
        "encoder_hidden_states_mask": torch.ones(batch, text, dtype=torch.long),
        "timestep": torch.rand(batch, generator=gen),
    }


def tiny_qwenimage(seed: int = 0, frames: int = 1, height: int = 4, width: int = 4) -> QwenImageStep:
    """A `QwenImageStep` over a tiny random `QwenImageTransformer2DModel` (`TINY_QWENIMAGE_CONFIG`), eval mode.

    Example::
        step = tiny_qwenimage()
        program = sparsec.capture(step, step.example_inputs(batch=2, text=7))
    """
    try:
        from diffusers import QwenImageTransformer2DModel
    except ImportError as exc:
        raise SparsecError("Qwen-Image's MMDiT comes from diffusers: pip install 'diffusers>=0.35'") from exc
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TINY_QWENIMAGE_CONFIG).eval()
    return QwenImageStep(transformer, frames, height, width).eval()


class QwenImageFamily(Family):
    """Qwen-Image's MMDiT, captured as one denoising step (`QwenImageStep`; example `seq` = prompt length)."""

    def example_inputs(self, model: torch.nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Step inputs with prompts of `seq` tokens; `model` must hold a `QwenImageStep`."""
        step = next((m for m in model.modules() if isinstance(m, QwenImageStep)), None)
        if step is None:
            raise SparsecError(
                f"{type(model).__name__} holds a QwenImageTransformer2DModel but no QwenImageStep; its forward needs "
                "img_shapes (a Python list), so wrap it: sparsec.families.qwenimage.QwenImageStep(transformer, height=..., width=...)"
            )
        return step.example_inputs(batch, seq, seed=seed)


# Each block has an image stream (generation) and a text stream (the prompt, understanding) that meet in one joint
# attention; timestep embedding, rotary and the attention op are shared. norm_out / proj_out read only image
# tokens: generation.
FAMILIES = (
    QwenImageFamily(
        name="qwenimage",
        module_classes=("QwenImageTransformer2DModel",),
        tags=(
            TagRule("**.img_in", "generation"),
            TagRule("**.img_mod", "generation"),
            TagRule("**.img_norm*", "generation"),
            TagRule("**.img_mlp", "generation"),
            TagRule("**.attn.to_q", "generation"),
            TagRule("**.attn.to_k", "generation"),
            TagRule("**.attn.to_v", "generation"),
            TagRule("**.attn.to_out", "generation"),
            TagRule("**.attn.norm_q", "generation"),
            TagRule("**.attn.norm_k", "generation"),
            TagRule("**.norm_out", "generation"),
            TagRule("**.proj_out", "generation"),
            TagRule("**.txt_in", "understanding"),
            TagRule("**.txt_norm*", "understanding"),
            TagRule("**.txt_mod", "understanding"),
            TagRule("**.txt_mlp", "understanding"),
            TagRule("**.attn.add_q_proj", "understanding"),
            TagRule("**.attn.add_k_proj", "understanding"),
            TagRule("**.attn.add_v_proj", "understanding"),
            TagRule("**.attn.to_add_out", "understanding"),
            TagRule("**.attn.norm_added_q", "understanding"),
            TagRule("**.attn.norm_added_k", "understanding"),
        ),
        builtin_models={"tiny-qwenimage": tiny_qwenimage},
    ),
)
