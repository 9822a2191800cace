"""The server core: model management and the request path, behind one wire-free API (`core.api`)."""
