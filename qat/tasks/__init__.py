"""Tasks: data loading and metrics (GLUE, language modelling)."""
