"""Recipes: the YAML text (``text``), its keys' types (``types``), the checks (``checks``) and
sections (``sections``) that turn it into a :class:`~qat.runs.recipe.config.QATConfig`
(``config``, with the fields of ``arguments``), and ``load``, which does all of it in order.
Import each name from the module that defines it."""
