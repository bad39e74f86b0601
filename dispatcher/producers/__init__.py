"""Where jobs come from: the sync ``Client`` (psycopg) and the ``AsyncClient``
(asyncpg), both running the same database steps (``plans``) so they cannot drift."""
