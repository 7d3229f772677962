"""Analyses of a program's graph: regions, structural patterns (FFNs, residual blocks), coupling, importance.

Its modules import one way, bottom first as `MODULE_ORDER` in tests/test_layers.py lists them: `vocabulary` (op sets,
node predicates, module paths) and `match` (`NoMatch`) at the bottom, then the matchers and what builds on them.
"""
