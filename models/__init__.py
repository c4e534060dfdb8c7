"""The model side of Floodgate: corpora, features, training, evaluation and the model registry."""
