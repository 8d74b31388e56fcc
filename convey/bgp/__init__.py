"""Scale-out: a tier of balancers behind a router's ECMP, each announcing its VIPs over BGP while it can serve them.

- ``model``: the ``[bgp]`` config types and their validation (core, sans-I/O; ``convey.config`` imports it).
- ``bird_config``: the BIRD 2 configuration for a set of peers and announced /32s (pure text rendering).
- ``birdctl``: BIRD's control socket protocol (a command in, reply lines out) and its ``show protocols`` parse.
- ``speaker``: BIRD as a supervised child of convey (foreground, private runtime dir, dies with convey).
- ``announcer``: ``Announcer``, what the engine calls: which VIPs to announce from the pools' health, reload,
  withdraw-all on stop, the ``/stats`` ``bgp`` section.

Nothing is imported here, so ``convey.config`` can import ``convey.bgp.model`` without pulling in the edges.
See docs/scale-out.md.
"""
