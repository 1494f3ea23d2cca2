"""Defaults and flag names shared by the library and the CLI, importable without torch."""

DEFAULT_OPSET = 20
DEFAULT_TOLERANCE = 1e-5
# converted forms against the float32 graph (and --fused int4 against PEFT): relative to the outputs' scale
FORM_TOLERANCES = {"web": 1e-5, "ort": 1e-4, "fp16": 2e-2, "int8": 0.25, "int4": 0.5}
TRUST_FLAG = "--trust-pickle"
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps one file at 2 GiB: graphs move weights to .data well before
