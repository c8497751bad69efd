"""The featurize stage: model references, target masks and the featurizer actor."""
