"""Analyses of a program's graph: regions, structural patterns (FFNs, residual blocks), coupling, importance."""
