"""catneuron: unsupervised pretraining of autoencoders on unlabeled video.

The work lives in three packages that depend one way only: `data_pipeline` (video to
shards, shards to batches), `pretrain` (models, trainer, exports) and `evals` (reads
exports through `pretrain.load_export`). This package only holds the command line.
"""

__version__ = "0.1.0"
