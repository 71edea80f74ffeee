"""Posterior designs that ``benchmarks/heldout_class.py`` compares with the shipped ones (none is shipped).

Each is a Denoiser built on a trained model's trunk: ``laplace`` (closed-form full-covariance
posterior of the head), ``head_ensemble`` (randomized-prior heads) and ``decoder_ensemble``
(decoder branches on the frozen encoder). Imported as ``heldout_baselines.<module>`` with
``benchmarks/`` on the path, as it is for ``python benchmarks/<script>.py``.
"""
