"""aios: train Hierarchical Reasoning Models (HRM ACT v1) on text."""

__version__ = "0.1.0"
