"""Evaluations of exports, in three rooms that import one way.

- `evals.features`: where images come from (dataset specs and their sources), the one
  feature extractor every eval reads, and its cache.
- `evals.probes`: linear probes, kNN, k-means, fine-tuning and the probe report
  (`catneuron probe`, `python -m evals.probe`).
- `evals.neurons`: top-k, selectivity, optimal stimuli, invariance and the neuron report
  (`catneuron neurons`, `python -m evals.neurons`).

Probes and neurons use features, never each other; `evals.io` holds the few output
helpers both write with. Every package `__init__` stays free of imports so that
`catneuron <eval> --help` answers before torch loads.
"""
