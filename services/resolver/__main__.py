"""``python -m services.resolver``: consume ip.seen, resolve, flush to persistence on geo.flush."""

from services.resolver.bootstrap import run
from shared.lifecycle import main

raise SystemExit(main("resolver", run))
