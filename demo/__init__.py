"""Synthetic data generator and trainer of listenloop's embedded demo model (training time only).

Nothing here is imported by the `listenloop` package; it needs torch, transformers and the
espeak-ng binary, none of which the runtime depends on.
"""
