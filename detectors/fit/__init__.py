"""Fitting: from a user's classifier and clean images to a model dir with a trained detector H.

Built on the core (``detectors.spec``, ``detectors.model_dir``, the gradient engine, the
signals and the detector runtime); serving never imports it.
"""
