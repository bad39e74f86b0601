"""The dispatcher's burn-down beside other Postgres job queues (``make bench-peers``).

``__main__.py`` orchestrates in our venv; each peer's worker script runs as a
subprocess of the peers' own interpreter (.venv-peers) or of Node, so their
dependencies never mix with ours. See bench/README.md, "Peers".
"""
