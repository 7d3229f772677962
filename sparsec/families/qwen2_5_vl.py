"""Qwen2.5-VL (transformers): in Qwen-Image it is the text encoder (prompt -> last hidden states,
`Qwen2_5_VLModel` on `input_ids` + `attention_mask`), the understanding side; as a stand-alone VLM it only
understands too."""

from __future__ import annotations

from sparsec.families.base import Family
from sparsec.ir.tags import TagRule

FAMILIES = (
    Family(
        name="qwen2_5_vl",
        model_types=("qwen2_5_vl",),
        tags=(
            TagRule("**.visual", "understanding"),
            TagRule("**.language_model", "understanding"),
            TagRule("lm_head", "understanding"),
        ),
    ),
)
