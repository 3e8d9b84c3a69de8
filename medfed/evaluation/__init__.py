"""Evaluation: FID, KID, precision/recall/density/coverage, Inception or classifier score on named feature
networks, memorization audits, per-site federated scores and the ``medfed evaluate`` report.

Modules are imported where used (``features``, ``classifier``, ``metrics``, ``memorization``, ``federated``,
``report``, ``cli``), so ``import medfed.evaluation`` stays light.
"""
