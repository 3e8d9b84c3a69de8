"""Federated training on Flower: site logic and policy, the FedAvg-of-deltas strategy, secure aggregation, the
Server/ClientApps and per-site evaluation rounds. Starting processes is :mod:`medfed.launch`."""
