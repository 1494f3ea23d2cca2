"""The runtime's exceptions: one family (``VeraError``), each also the built-in type callers expect."""


class VeraError(Exception):
    """Any failure vera_runtime can name: the message says which file, input or task, and what to do."""


class DeviceError(VeraError, RuntimeError):
    """The requested execution provider cannot run here; the message says what is missing."""


class FeedError(VeraError, ValueError):
    """Inputs given to ``VeraSession.run`` do not match the graph (name, dtype, rank or tasks)."""


class ClosedError(VeraError, RuntimeError):
    """A VeraSession was used after ``close()``."""


class GraphError(VeraError, ValueError):
    """ONNX Runtime cannot load a graph file (damaged, or its external data is refused)."""


def printable(text: object, limit: int = 200) -> str:
    """A string from a file or a request as a message or a terminal may show it: control characters
    and lone surrogates escaped (``\\x1b``, not ESC), at most ``limit`` characters."""
    text = str(text)
    clipped = text[:limit] + ("..." if len(text) > limit else "")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in clipped)
