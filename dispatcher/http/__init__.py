"""The HTTP API every replica serves (FastAPI).

``app.build_api`` assembles it: one router per concern (``probes``, ``cluster``,
``jobs``, ``job_types``), what they share as dependencies (``dependencies``: the
replica, its settings, the AsyncClient, the bearer token), the error mapping
(``errors``) and the request size limit (``body_limit``).
"""
