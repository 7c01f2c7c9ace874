"""Fitting codebooks to data or distributions: library functions
(the commands live in ``qat.cli``)."""
