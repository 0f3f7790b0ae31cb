"""The features room: what every eval reads, and nothing that evaluates.

`datasets` (the `EvalDataset` every eval opens, splits, shards), `sources` (where images
come from: each dataset spec and the loader behind it), `models` (what features are
extracted from: an export, its random-init twin, raw pixels), `extractor` (the one
forward pass, pooled and per-unit) and `cache` (its files on disk). Imports nothing
from `evals.probes` or `evals.neurons`, so both can build on it.
"""
