"""int4 / int8 weight formats, quantizers (RTN, HQQ), QuantLinear and QuantExperts."""
from .experts import QuantExperts
from .formats import QuantizedTensor, dequantize, quantize
from .linear import DEFAULT_SKIP, QuantLinear, quantize_model_linears

__all__ = ["QuantizedTensor", "quantize", "dequantize", "QuantLinear", "QuantExperts",
           "quantize_model_linears", "DEFAULT_SKIP"]
