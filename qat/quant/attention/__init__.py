"""Quantised attention: ``interface`` (the ``"qat"`` attention registered with transformers:
eager, or block by block of query rows for long sequences), ``block`` (that block path),
``cpu`` (its fused C++ kernel over ``csrc/``, built at first use) and ``flash`` over
``flash_kernels`` (flash-style Triton kernels on CUDA, P quantised in registers)."""
