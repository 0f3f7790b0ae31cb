"""Unlabeled video to WebDataset frame shards (on Ray), and shards to training batches.

Knows nothing of models: `pretrain` and `evals` read data through the loader here.
"""
