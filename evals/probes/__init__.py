"""The probes room: how well an export's features predict labels.

`linear` (SGD heads and L-BFGS logistic regression), `knn`, `clustering` (k-means),
`finetune`, `report` (metrics.json, curves, TensorBoard) and `cli` (`catneuron probe`;
`python -m evals.probe` runs it). Reads features through `evals.features` only, never
`evals.neurons`.
"""
