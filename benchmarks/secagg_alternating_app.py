"""ServerApp for ``bench_secagg.py``: one run whose rounds switch SecAgg+ on and off (both arms, one machine state).

Round 1 runs SecAgg+ and is not compared (it also pays Ray's start-up and asks the sites' example counts). From
round 2 on the rounds go in blocks of four: plain, SecAgg+, SecAgg+, plain, so a steady drift of the machine's
speed falls equally on both arms. Sites need no change: they follow whatever protocol the server's messages use.
"""

from __future__ import annotations

import dataclasses
from typing import cast

from flwr.app import Context
from flwr.server import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.serverapp import Grid, ServerApp

from medfed.federation.server import FederatedRound, run_server


def is_secure_round(local_round: int) -> bool:
    return local_round == 1 or (local_round - 2) % 4 in (1, 2)


@dataclasses.dataclass
class AlternatingRound(FederatedRound):
    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        local_round = cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        secagg = dataclasses.replace(self.cfg.secagg, enabled=is_secure_round(local_round))
        self.cfg = dataclasses.replace(self.cfg, secagg=secagg)
        super().__call__(grid, context)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context, fit_round_type=AlternatingRound)
