"""Clinician review: blinded reader-study exports, the offline rating page, ratings import and the report.

Modules: ``study`` (file formats), ``approval`` (the site-approval gate for real images), ``dicom`` (Secondary
Capture writer), ``page`` (the rating page), ``export``, ``ratings`` (import and validation), ``stats`` and
``report``; ``cli`` is ``medfed review``.
"""
