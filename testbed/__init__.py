"""convey's network namespace test beds, shared by tests/, bench/ and scripts/demo.py (root only to build one).

    from testbed.bed import Testbed
    from testbed.httpd_proc import start_httpd

    with Testbed.create(kind="routed", servers=2) as bed:
        web = [start_httpd(server, port=8080) for server in bed.servers]
        body = bed.client.curl(f"http://{bed.servers[0].addr}:8080/")

Modules, from the bottom up:

- ``process``: ``REPO_ROOT``, ``TestbedError``, ``wait_until`` (poll, never sleep), ``read_line`` (bounded),
  ``stop_process`` (a process group: SIGTERM, then SIGKILL), ``python_env`` (the repository on PYTHONPATH).
- ``namespaces``: the ``cvy-`` prefix, ``ns_exec``, ``delete_namespace``, ``cleanup_leftovers`` and
  ``unusable_reason`` (why beds cannot be built here: not root, a tool missing; tests skip with it).
- ``host``: ``Host``, one namespace: run commands and Python in it, sockets from it, sysctls, pyroute2.
- ``bed``: ``Testbed``, the ``routed`` and ``l2`` topologies, and their teardown (also at interpreter exit).
- ``httpd`` (``python -m testbed.httpd``, standard library only) and ``httpd_proc`` (``start_httpd`` in a host).
- ``conn_load`` (``python -m testbed.conn_load soak|mixed``): one asyncio process holding thousands of connections
  to httpd servers, each exchange checked by sha256 (the robustness tests' soak and faults-under-load clients).
- ``convey_proc``: ``ConveyProcess``, the real ``convey`` in the balancer's namespace, /stats polled.
- ``dsr``: DSR servers prepared with scripts/setup-dsr-backend.sh, the return router, the DSR demo.

``python -m testbed clean [--prefix cvy-]`` (``make clean-netns``) removes leftover namespaces of every bed, not
only this process's: do not run it while other test runs are using theirs. ``python -m testbed list`` lists them.

A development tool, not part of the installed ``convey`` package (pyproject packages ``convey*`` only): tests, bench
scripts and the demo run from a checkout and find it on the repository root (pytest's ``pythonpath``, the scripts'
own ``sys.path`` line, ``python_env`` for children).
"""
