"""Checkpoint to ONNX model package exporter (needs the [export] extra: torch, transformers)."""
