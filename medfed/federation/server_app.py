"""The Flower ServerApp run by the coordinator (simulation and deployment alike)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medfed.federation.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg of site deltas for ``federation.rounds`` rounds; outputs go to the run folder."""
    run_server(grid, context)
