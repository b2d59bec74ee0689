"""``python -m services.persistence``: write geo.upsert batches to geo_cache; answer re-resolve."""

from services.persistence.bootstrap import run
from services.persistence.stores import check_database
from shared.lifecycle import main

raise SystemExit(main("persistence", run, checks=(check_database,)))
