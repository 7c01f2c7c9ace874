"""qat: block-quantisation-aware fine-tuning for Hugging Face transformers."""

from qat import hf_quantizer  # noqa: F401  (registers the "qat" quant method with transformers)
from qat.formats import make_format
from qat.quant_config import QuantConfig, QuantConfigError
from qat.quantize import quantization_summary, quantize_model

__version__ = "0.1.0"
__all__ = ["QuantConfig", "QuantConfigError", "make_format", "quantization_summary",
           "quantize_model"]
