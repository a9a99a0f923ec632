"""Helpers of ``tools/benchmark.py``, the throughput profiler: one module per job.

* :mod:`tools.bench.settings`: the matrix of settings and the result record;
* :mod:`tools.bench.monitor`: CPU utilisation, peak RSS (process and workers) and GPU utilisation/memory;
* :mod:`tools.bench.measure`: warm-up and timed windows of one setting (loader, train, upper bound);
* :mod:`tools.bench.runner`: runs one setting in its own process (``python -m tools.bench.runner``);
* :mod:`tools.bench.data`: resolves ``--data``, converts into a cache where a loader needs it;
* :mod:`tools.bench.machine`: the machine description (CPU, RAM, GPU, driver, library versions, commit);
* :mod:`tools.bench.report`: verdicts, the tuned setting, results.json / results.md / PNG plots.
"""
