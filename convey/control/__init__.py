"""The runtime control API (issue 11): server overlay (weight, drain, maintenance), flows you can read, and the
reload preview. ``api`` answers requests as plain functions, ``http`` puts them on the stats service, ``sources``
binds them to one engine; ``overlay``, ``flows``, ``diff`` and ``token`` are sans-I/O."""
