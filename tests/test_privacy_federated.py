"""Privacy in real Flower runs: per-site caps, refusals the server records, reports, NOT PRIVATE labels."""

import json

import pytest

from conftest import small_run_config
from medfed.checkpoint import load_checkpoint
from medfed.launch.simulation import run_simulation
from medfed.privacy.accounting import epsilon, plan_noise
from medfed.privacy.ledger import Ledger
from medfed.privacy.report import from_ledger, from_run, write_report

pytestmark = pytest.mark.slow  # every test starts a Flower simulation


@pytest.fixture(scope="module")
def capped_run(tmp_path_factory, breastmnist):
    # 200 images over 4 IID sites: 50 each, batch 32 -> q = 1/2, 2 steps per round
    plan = plan_noise(50, 32, 1, 3, target_epsilon=8.0, delta=1e-5, accountant="rdp")
    one_round = epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)], 1e-5, "rdp")
    tight_cap = one_round * 1.01
    out = tmp_path_factory.mktemp("dp")
    cfg = small_run_config(out, "capped", **{
        "data.dataset": "npz", "data.path": str(breastmnist), "data.limit": 200, "federation.num-sites": 4,
        "federation.rounds": 3, "federation.min-sites": 3, "privacy.site-cap-epsilon": f"100,100,100,{tight_cap}"})
    return run_simulation(cfg, show_progress=False), tight_cap


def test_site_over_its_cap_refuses_and_the_run_goes_on(capped_run):
    run, tight_cap = capped_run
    rounds = {r.round: r for r in run.rounds()}
    assert all(rounds[r].aggregated for r in (1, 2, 3))
    assert sorted(rounds[1].epsilon) == ["site-0", "site-1", "site-2", "site-3"]
    for r in (2, 3):
        assert rounds[r].participants == ["site-0", "site-1", "site-2"]
        (refused,) = [s for s in rounds[r].sites if s.site == "site-3"]
        assert (refused.status.value, refused.reason.value) == ("refused", "privacy-cap")
    eps = [rounds[r].epsilon["site-0"] for r in (1, 2, 3)]
    assert eps == sorted(eps) and 7.8 < eps[-1] <= 8.0 + 1e-9  # the planned target, reached in the last round
    caps = {s.site: s.cap_epsilon for s in rounds[1].sites}
    assert caps == {"site-0": 100.0, "site-1": 100.0, "site-2": 100.0, "site-3": pytest.approx(tight_cap)}


def test_ledgers_show_no_spend_beyond_the_cap(capped_run):
    run, tight_cap = capped_run
    ledgers = {p.parent.name.split("-")[1]: Ledger(p) for p in (run.root.parent / "site-state").glob("*/*.jsonl")}
    assert sorted(ledgers) == ["0", "1", "2", "3"]
    kinds = [e.kind for e in ledgers["3"].entries()]
    assert kinds == ["round", "refusal", "refusal"]
    assert ledgers["3"].entries()[0].data["epsilon"] <= tight_cap
    assert [e.kind for e in ledgers["0"].entries()] == ["round"] * 3


def test_privacy_report_and_summary(capped_run, tmp_path):
    run, tight_cap = capped_run
    summary = json.loads(run.summary_path.read_text())["privacy"]
    assert summary["label"].startswith("DP-SGD") and summary["sites"]["site-3"]["cap_epsilon"] == tight_cap
    site_reports = [from_ledger(p.parent) for p in sorted((run.root.parent / "site-state").glob("*/*.jsonl"))]
    reports = from_run(run.root) + site_reports
    paths = write_report(reports, tmp_path / "report")
    payload = json.loads(paths["json"].read_text())
    by_source = {(s["site"], s["source"].split()[0]): s for s in payload["sites"]}
    for site in ("site-0", "site-1", "site-2", "site-3"):
        # what the site reported to the server equals what its own ledger recomputes
        assert by_source[(site, "run")]["spent_epsilon"] == pytest.approx(by_source[(site, "ledger")]["spent_epsilon"],
                                                                          abs=1e-9)
    assert by_source[("site-3", "ledger")]["cap_epsilon"] == pytest.approx(tight_cap)
    assert len(by_source[("site-3", "ledger")]["refusals"]) == 2
    text = paths["markdown"].read_text()
    assert "site-3" in text and "refused" in text.lower()
    assert paths["plot"].stat().st_size > 0 and "<table>" in paths["html"].read_text()


def test_non_private_run_says_so_everywhere(tmp_path, breastmnist):
    cfg = small_run_config(tmp_path, "open", **{
        "data.dataset": "npz", "data.path": str(breastmnist), "data.limit": 60, "federation.num-sites": 3,
        "federation.rounds": 1, "privacy.enabled": False, "policy.require-dp": False})
    run = run_simulation(cfg, show_progress=False)
    records = run.read_metrics()
    assert all(r["privacy"] == "NOT PRIVATE" for r in records)
    assert "epsilon" not in json.dumps([r.get("epsilon") for r in records if r.get("epsilon")])
    assert json.loads(run.summary_path.read_text())["privacy"]["label"] == "NOT PRIVATE"
    assert load_checkpoint(run.latest_checkpoint).extra["privacy"] == "NOT PRIVATE"
    assert [p.name for p in run.samples.glob("*.png")] == ["round_0001_NOT_PRIVATE.png"]
    reports = from_run(run.root)
    assert reports and all(not r.private for r in reports)
    assert "NOT PRIVATE" in write_report(reports, tmp_path / "r")["markdown"].read_text()
