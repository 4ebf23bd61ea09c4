"""Data preparation for training and evaluation (see data/README.md)."""
