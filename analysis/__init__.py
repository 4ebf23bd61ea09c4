"""Analyses behind the paper's figures: routing entropy (Fig. 1A), spectral alignment (Fig. 1B / S2),
gradient conflict (Fig. S3) and routing patterns (Fig. S4). Each module is a CLI and an importable function."""
