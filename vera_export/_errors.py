"""The exporter's exceptions. Every message names the file, layer or input and says what to do."""

from vera_runtime import VeraError


class VeraExportError(VeraError):
    """Raised for any input vera-export cannot handle; the CLI prints it as one line."""


class UntrustedFileError(VeraExportError):
    """A pickle needs a class outside the allowlist: loading it would run code from the file."""
