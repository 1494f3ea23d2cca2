"""Default input specs for a transformers model, by the modality its ``main_input_name`` names."""

from __future__ import annotations

from torch import nn

from ._errors import VeraExportError

_BATCH = "batch=2"


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _audio_samples(config, frames: int = 8) -> int:
    """The waveform length whose convolutional feature encoder yields ``frames`` frames."""
    samples = frames
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride, strict=True))):
        samples = (samples - 1) * stride + kernel
    return samples


def _main_inputs(main: str, config) -> list[str]:
    if main == "input_ids":
        return [f"input_ids:int64<{config.vocab_size}:{_BATCH},sequence=8",
                f"attention_mask:int64<2:{_BATCH},sequence=8"]
    if main == "pixel_values":
        height, width = _pair(config.image_size)
        return [f"pixel_values:float32:{_BATCH},{config.num_channels},{height},{width}"]
    if main == "input_values":
        return [f"input_values:float32:{_BATCH},samples={_audio_samples(config)}"]
    if main == "input_features":  # Whisper: a fixed number of frames, twice the encoder's positions
        return [f"input_features:float32:{_BATCH},{config.num_mel_bins},{2 * config.max_source_positions}"]
    raise VeraExportError(
        f"no default inputs for a model whose main input is '{main}': describe each forward argument with"
        " --input NAME:DTYPE[<HIGH]:DIMS."
    )


def default_input_specs(model: nn.Module) -> list[str]:
    """The main input (token ids and mask, pixels, a waveform or mel features) with a symbolic batch,
    plus ``decoder_input_ids`` for encoder-decoders."""
    config = model.config
    specs = _main_inputs(getattr(model, "main_input_name", "input_ids"), config)
    if getattr(config, "is_encoder_decoder", False):
        specs.append(f"decoder_input_ids:int64<{config.vocab_size}:{_BATCH},decoder_sequence=4")
    return specs
