"""QDEC, dynamic error compensation of quantised linears at inference (DecDEC): ``apply``
(what the commands call), ``config`` (the ``qdec:`` section), ``residual`` (the residual's
maths and storage), ``attach`` (hooks on a model) and ``files`` (save and load)."""
