"""``python -m xentkit``: the same as the ``xentkit`` command."""

from xentkit.cli import main

raise SystemExit(main())
