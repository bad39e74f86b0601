"""The bottom layer: what everything else is made of, importing nothing from the rest
of the package. The App and its executor declarations (``app``), the job row model
and its JSON codec (``records``), errors, settings (``config``), schema names and the
named queries loaded from ``sql/`` (``schema``, ``queries``), retry and backoff
(``retry``), metrics, logging, cancellation-safe waits, and which database errors are
transient (``database_errors``).

Import-linter enforces the layers (``[tool.importlinter]`` in pyproject.toml):
``cli`` > ``runtime`` > ``http`` | ``services`` > ``producers`` > ``database`` > ``core``.
"""
