"""Data: the batch container, AnnData reading, the processed store, units, loaders, synthetic data.

Nothing here knows the model; importing this package loads nothing heavy.
"""
