"""tinyserve: a model-inference server for PyTorch models (versioned repository, compressed weights, TCP).

`tinyserve.Client` and `tinyserve.AsyncClient` are imported on first use, so `import tinyserve` stays
light (no numpy, msgpack or torch until a client is asked for)."""

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str):
    if name in ("Client", "AsyncClient"):
        from tinyserve import client

        return getattr(client, name)
    raise AttributeError(f"module 'tinyserve' has no attribute {name!r}")
