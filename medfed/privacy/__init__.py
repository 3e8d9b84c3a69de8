"""Differential privacy at each site: Opacus DP-SGD, the site's budget ledger, and privacy reports."""
