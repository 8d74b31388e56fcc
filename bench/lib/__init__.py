"""The benchmarks' shared library; bench/*.py are thin scenarios over it.

- ``roles``: every role a benchmark runs in a process of its own, by name (``python -m bench.lib.roles NAME``):
  ``traffic`` (request/reply and bulk servers and clients), ``packet_roles`` (accept-only NFQUEUE loop, frame
  blaster, held-open flows) and ``convey_proxy`` (convey's relay built in-process from a TOML string).
- ``procs``: starting roles in a test bed's namespace (``spawn_in``) or on this host (``Children``), asking them
  (``ask``), reading their result (``result_of``), stopping them.
- ``cpu``: ``cpu_times`` of a process, busy CPUs of the machine, pinning.
- ``rounds``: interleaved A/B rounds, median and spread, progress lines.

The scripts put the repository root first on ``sys.path`` (so ``bench.lib`` and ``testbed`` import from a fresh
clone); roles get it through PYTHONPATH.
"""
