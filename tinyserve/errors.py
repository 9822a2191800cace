"""The closed set of tinyserve errors.

Every failure tinyserve reports is one of the classes below.  Each class has a stable wire ``code``
(used by the server and the client later); ``ERROR_CLASSES`` is the one table mapping codes to
classes.  Messages name the offending item (file, tensor, chunk, field) and the limit it broke.
"""

from __future__ import annotations


class TinyserveError(Exception):
    """Base of every tinyserve error."""

    code = "INTERNAL"


# --- weights files --------------------------------------------------------------------------------
class FormatError(TinyserveError):
    """A weights file (or a buffer claimed to be one) is invalid."""

    code = "BAD_FORMAT"


class TruncatedError(FormatError):
    """The file or a stream inside it ends before the bytes it declares."""

    code = "TRUNCATED"


class LimitError(FormatError):
    """A declared length, count or size breaks a documented limit (or would overflow)."""

    code = "LIMIT_EXCEEDED"


class LayoutError(FormatError):
    """Offsets or sizes are inconsistent: holes, overlaps, out of file, wrong file size, non-zero padding."""

    code = "BAD_LAYOUT"


class UnsupportedError(FormatError):
    """An unknown version, dtype, encoding or codec."""

    code = "UNSUPPORTED"


class ChecksumError(FormatError):
    """Stored bytes do not match their checksum (bit rot, tampering, a partial copy)."""

    code = "CHECKSUM_MISMATCH"


class CorruptDataError(FormatError):
    """A compressed stream is malformed (invalid code, wrong decoded length, trailing bytes)."""

    code = "CORRUPT_DATA"


class DestinationError(TinyserveError, ValueError):
    """A destination buffer has the wrong size, dtype or is not writable / contiguous."""

    code = "BAD_DESTINATION"


# --- repository and models ------------------------------------------------------------------------
class RepositoryError(TinyserveError):
    """A repository operation failed (missing root, unreadable version, failed install)."""

    code = "REPOSITORY"


class InvalidNameError(RepositoryError, ValueError):
    """A model name or version is not allowed (path traversal, separators, bad characters, too long)."""

    code = "INVALID_NAME"


class ModelNotFoundError(RepositoryError, LookupError):
    """No such model or version in the repository."""

    code = "NOT_FOUND"


class VersionExistsError(RepositoryError):
    """Another writer installed this model version first."""

    code = "ALREADY_EXISTS"


class ConfigError(TinyserveError, ValueError):
    """A model or server configuration is invalid."""

    code = "INVALID_CONFIG"


class ModelError(TinyserveError):
    """Building, loading or running a model failed."""

    code = "MODEL_ERROR"


# --- requests (the wire codes; tinyserve.wire defines the others on WireError) ----------------------
class WireError(TinyserveError):
    """A protocol-level error with a wire code; `fatal` ones close the connection.  `rid`: the request
    id the error reply carries when the request is not otherwise known (a BAD_FRAME whose header
    yielded its id), else 0."""

    fatal = False
    rid = 0


class InvalidInput(WireError):
    """A request's tensors are wrong for the model (wire code INVALID_INPUT, the client's mistake):
    also what a model's preprocess hook raises to refuse a request (here, so that code below the
    wire in the layering, tinyserve.formats, can raise it)."""

    code = "INVALID_INPUT"


ERROR_CLASSES: dict[str, type[TinyserveError]] = {
    cls.code: cls
    for cls in (
        TinyserveError,
        FormatError,
        TruncatedError,
        LimitError,
        LayoutError,
        UnsupportedError,
        ChecksumError,
        CorruptDataError,
        DestinationError,
        RepositoryError,
        InvalidNameError,
        ModelNotFoundError,
        VersionExistsError,
        ConfigError,
        ModelError,
    )
}


def error_from_code(code: str, message: str) -> TinyserveError:
    """Rebuild an error from its wire code (unknown codes become the base class)."""
    return ERROR_CLASSES.get(code, TinyserveError)(message)
