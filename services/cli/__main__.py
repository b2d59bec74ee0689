"""``python -m services.cli``: the same as the ``bangui-geo`` console script."""

from services.cli.main import main

raise SystemExit(main())
