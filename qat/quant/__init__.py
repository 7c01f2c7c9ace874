"""Quantised models: the quant config, the STE fake quantiser and its backends, quantised
modules and attention, ``quantize_model``, LoRA on quantised layers, density. Knows nothing of
tasks or training loops."""
