"""Measuring a model: GLUE metrics (``evaluate``), perplexity of a qat model or of a GGUF file in
llama.cpp (``perplexity``) and generation speed (``generate``)."""
