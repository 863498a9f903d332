"""int4 / int8 weight formats, quantizers (RTN, HQQ), QuantLinear and QuantExperts.
quant/swap.py: which modules of a model are quantized, QuantConfig, swap_to_quantized."""
from .experts import QuantExperts
from .formats import QuantizedTensor, dequantize, quantize
from .linear import QuantLinear

__all__ = ["QuantizedTensor", "quantize", "dequantize", "QuantLinear", "QuantExperts"]
