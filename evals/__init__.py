"""Evaluations of exports: probes, kNN, clustering and neuron analysis on one feature cache.

Kept free of heavy imports so that `catneuron <eval> --help` answers fast: import
`evals.datasets` (dataset specs) and `evals.features` (extraction and cache) directly.
"""
