"""listenloop: an edge runtime for always-on audio language models."""
__version__ = "0.1.0"
