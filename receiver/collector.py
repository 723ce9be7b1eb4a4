"""Python's cycle collector, made cheap for a process that serves from here on.

    settle_collector()   # once `receiver serve` has started: the app's lifespan, when
                         # app.state.settles_collector (set by `receiver serve`, each of --workers N)

Everything alive once a process has started (modules, routes, settings, the
store) lives as long as the process: `gc.freeze` takes it out of every later
collection. And a callback makes a few hundred short-lived objects, so with the
default threshold (700) young collections ran every few requests and, through
them, full collections over the whole heap every second or so: the pauses
behind most of ingest's 99th percentile (bench/README.md). Cycles are still
collected, once 50,000 new objects have piled up.
"""

from __future__ import annotations

import gc


def settle_collector() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
