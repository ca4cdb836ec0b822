"""``python -m fastcluster_cl.bench [static] ...``: the runner, or the static report."""

from .runner import main

raise SystemExit(main())
