"""The benchmarks' shared library; bench/*.py are thin scenarios over it.

- ``roles``: every role a benchmark runs in a process of its own, by name (``python -m bench.lib.roles NAME``):
  ``traffic`` (request/reply and bulk servers and clients), ``packet_roles`` (accept-only NFQUEUE loop, frame
  blaster, held-open flows) and ``convey_proxy`` (convey's relay built in-process from a TOML string).
- ``procs``: starting roles in a test bed's namespace (``spawn_in``) or on this host (``Children``), asking them
  (``ask``), reading their result (``result_of``), stopping them.
- ``cpu``: ``cpu_times`` of a process, busy CPUs of the machine, pinning.
- ``rounds``: interleaved A/B rounds, median and spread (``Series``: every value of every round), progress lines,
  Markdown tables.
- ``l4``: bulk Gbit/s both ways (iperf3, or the Python bulk roles) and connections/s (bench/loadgen.c compiled at
  run time, or the Python rr roles) through a test bed's row, packets that reached convey per connection and per
  MB, rows run A/B/A/B with skips (``run_rows``), the table and the ratios of bench/packet.py and bench/dsr.py.
- ``blast``: packets/s through a userspace verdict path under a blast of prebuilt frames.

The scripts put the repository root first on ``sys.path`` (so ``bench.lib`` and ``testbed`` import from a fresh
clone); roles get it through PYTHONPATH.
"""
