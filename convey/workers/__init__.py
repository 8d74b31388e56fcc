"""Worker processes: a supervisor and N workers for every mode (see docs/architecture.md, "Workers").

:mod:`convey.workers.slices` splits a config into the workers' shares (pure); :mod:`convey.workers.merge` sums
their /stats documents (pure); :mod:`convey.workers.supervisor` and :mod:`convey.workers.child` are the two
ends of the process boundary.
"""
