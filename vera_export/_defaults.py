"""Defaults and flag names shared by the library and the CLI, importable without torch."""

DEFAULT_OPSET = 20
DEFAULT_TOLERANCE = 1e-5
TRUST_FLAG = "--trust-pickle"
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps one file at 2 GiB: graphs move weights to .data well before
