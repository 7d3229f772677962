"""Built-in rewrite passes (`sparsec.passes`), one module each.

- `drop_layers`: depth pruning; drop blocks, attention or MLP sublayers (explicit or by cosine score).
- `slice_neurons`: width pruning; keep the most important FFN neurons (activation, magnitude or random).
- `real_rotary` (lowering): complex rotary embeddings rewritten in real arithmetic, for ONNX.
- `import_moe` (`moe_layout`): the paper's released MoE checkpoints read into MoE nodes; `export_paper_moe`
  writes sparsec's MoEs back into that layout.

They register by name through the `sparsec.passes` entry-point group (see pyproject.toml), the same way
third-party passes do; the core never imports a particular pass.
"""
