"""Number formats: pure tensor functions, selected by name with ``make_format(spec)``."""

# Importing a family's module registers its formats.
from qat.formats import bfp, blocklog, codebook, ggml, integer, lobcq, minifloat, mx, nvfp4  # noqa: F401
from qat.formats.base import Format, FormatError
from qat.formats.registry import FORMATS, format_params, make_format, register_format

__all__ = ["FORMATS", "Format", "FormatError", "format_params", "make_format", "register_format"]
