"""The GLUE metrics as an ``evaluate`` module: ``evaluate.load(<this folder>, task)``.

``glue_metric.py`` is the module ``evaluate`` loads; ``qat.tasks.glue.load_metric`` does it for you.
"""
