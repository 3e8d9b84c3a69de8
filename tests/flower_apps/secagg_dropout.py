"""Five sites; round 1 loses one after key sharing, round 2 loses three (below the threshold)."""

from medfed_test_apps.secagg_probe import make_app

app = make_app({1: {4}, 2: {2, 3, 4}})
