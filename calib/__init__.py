"""Calibration and evaluation data, activation statistics and range estimators."""
