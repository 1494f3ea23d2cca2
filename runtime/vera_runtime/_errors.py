"""The runtime's exceptions, beside ContractError and TaskFileError."""


class DeviceError(RuntimeError):
    """The requested execution provider cannot run here; the message says what is missing."""


class FeedError(ValueError):
    """Inputs given to ``VeraSession.run`` do not match the graph (name, dtype, rank or tasks)."""
