"""The neurons room: what single units of an export respond to (the cat neuron).

`topk` (streaming top inputs per unit), `selectivity` (concept scores against random
weights), `stimulus` (optimal stimuli, receptive fields), `invariance`, `analysis`
(assembles the figures), `panels`, `index` and `report` (the HTML report) and `cli`
(`catneuron neurons`; `python -m evals.neurons` runs `__main__`). Reads features through
`evals.features` only, never `evals.probes`.
"""
