"""Calibration data, activation statistics, quality metrics and bounds, backend parity, distillation."""
