"""tinyserve: a model-inference server for PyTorch models (versioned repository, compressed weights, TCP)."""

__version__ = "0.1.0"
