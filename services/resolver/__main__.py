"""``python -m services.resolver``: consume ip.seen, resolve, flush to persistence on geo.flush."""

from services.resolver.bootstrap import run
from services.resolver.provider_files import check_provider_files
from shared.lifecycle import main

raise SystemExit(main("resolver", run, checks=[check_provider_files]))
