"""``python -m services.timer``: publish geo.flush and geo.re_resolve on a fixed cadence."""

from services.timer.bootstrap import run
from shared.lifecycle import main

raise SystemExit(main("timer", run))
