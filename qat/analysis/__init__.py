"""Analysis of quantised models: per-layer profiles, sensitivity, mixed-precision search."""
