"""Administering the database: migrations (``migrate``), least-privilege roles
(``roles``) and the embedded development server (``embedded``)."""
