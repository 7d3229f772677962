"""Lowering backends (`sparsec.exporters`), one module each."""
