"""Federated training on Flower: site logic, the FedAvg-of-deltas strategy, the Server/ClientApps, launchers."""
