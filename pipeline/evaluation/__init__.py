"""Evaluation: the paper's Table 1 report and the U-Net swap experiment."""
