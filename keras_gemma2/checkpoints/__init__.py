"""Checkpoint formats in and out (transformers, KerasHub), the preset registry and downloads: data only."""
