"""Evaluation: FID, KID, precision/recall/density/coverage, Inception or classifier score on named feature
networks, memorization audits, per-site federated scores and the ``medfed evaluate`` report.

Modules are imported where used (``network``, ``features``, ``classifier``, ``metrics``, ``memorization``,
``utility``, ``report``, ``cli``), so ``import medfed.evaluation`` stays light. Nothing here imports Flower: the
federated evaluation rounds are :mod:`medfed.federation.evaluation`.
"""
