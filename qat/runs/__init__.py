"""Runs on disk and in YAML: recipes, run folders and checkpoints (``qat_config.json``), and
the one model builder for every source."""
