"""``python -m bench``: the benchmark command (see ``bench.cli``)."""

from bench.cli import main

raise SystemExit(main())
