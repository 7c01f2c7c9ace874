"""Deployment: bit packing, packed export, and the transformers HfQuantizer that loads it."""
