"""``python -m dispatcher.cli``: the command line."""

from dispatcher.cli.main import main

raise SystemExit(main())
