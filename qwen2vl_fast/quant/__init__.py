"""Weight-only quantization: GPTQ and AWQ checkpoints repacked into one runtime layout (weight.py), the
quant_linear op, and the quantizer."""

from .weight import QuantizedParts, QuantizedWeight, dequantize, pack_int32, unpack_int32  # noqa: F401
