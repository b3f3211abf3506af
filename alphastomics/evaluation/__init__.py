"""Evaluation on arrays: metrics, one slice's scores (:func:`score_slice`), baselines, figures.

Nothing here samples a model: callers pass the true and the predicted arrays.
"""
