"""The sans-I/O packet core of the passthrough and DSR modes.

``checksum`` (RFC 1071 sums, RFC 1624 deltas), ``ipv4`` (parse, in-place rewrite, resets), ``ports``
(ephemeral port allocation), ``flows`` (the flow table), ``passthrough`` and ``dsr`` (the per-packet decisions;
``decide`` is what the NFQUEUE edge calls), ``fastpath`` (the one hot path both decisions compile), ``counters``
(what they count, one vocabulary for both modes). No sockets, threads or clocks: time comes in as ``now``
(seconds, monotonic).
"""
