"""``python -m services.resolver``: consume ip.seen, resolve, flush to persistence on geo.flush."""

from services.resolver.bootstrap import run
from shared.lifecycle import main
from shared.settings import check_provider_files

raise SystemExit(main("resolver", run, checks=[check_provider_files]))
