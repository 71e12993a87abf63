"""adamgen's benchmark suite: adamgen against its peers and the memory-bandwidth limit.

Run it with ``python -m benchmarks.run`` (or ``adamgen bench``); ``--quick`` is the CI smoke run.
See ``docs/performance.md`` for how to read the report and the latest figures from the
development machine.
"""
