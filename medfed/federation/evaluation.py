"""Per-site evaluation in federated runs: each site scores the global model it holds and replies with numbers only.

Every ``evaluation.every-rounds`` rounds (and after the last round) the server sends each site an evaluation
request that carries **no pixels and no model**: only the round. Each site loads the global model it received for
training in that run (kept in its state folder at fit time), draws ``evaluation.num-samples`` images from it with
a seed derived from the run's seed and the round (so every site scores the same samples, and nobody else chooses
the images a site is compared against), scores them against its **own test images** (FID, KID,
precision/recall/density/coverage, classifier or Inception score, on ``evaluation.feature-network``) and audits
them against its **own training images** (:mod:`medfed.evaluation.memorization`). The reply is an
``EvaluateRes`` of scalars: the scores, and of the audit only whether it passed and how many near-copies it
found. The server refuses replies that carry arrays or byte strings, records every site's numbers and their
example-weighted mean (weights: each site's number of test images) in ``evaluation.jsonl``, and plots them.

What this reveals: the scores are statistics of the site's private test images and the audit's count is a
statistic of its training images, both **outside any differential-privacy guarantee**. A site answers only when
its policy says ``share-evaluation = true`` (the default is false). A coordinator that sends a crafted model for
training (every site then trains on it and spends budget) could learn from the near-copy count whether images
that model generates are close to a site's training images; that is why the count is all that leaves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from logging import ERROR
from pathlib import Path
from typing import Any, cast

import flwr.compat.common.recorddict_compat as compat
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common import Code, EvaluateIns, EvaluateRes, Status, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.serverapp import Grid

from medfed.config import RunConfig
from medfed.datasets import ImageDataset
from medfed.devices import resolve_device
from medfed.diffusion import sample_images
from medfed.errors import MedfedError
from medfed.evaluation.features import FeatureNetwork, FeatureSet, extract_features, load_feature_network
from medfed.evaluation.memorization import audit_memorization, images_sha256
from medfed.evaluation.metrics import compute_scores
from medfed.contracts import NodeConfig, Reason, Refusal
from medfed.federation.context import run_config_of
from medfed.federation.policy import Refused, node_of
from medfed.federation.site import Site, held_global_model, load_site
from medfed.federation.weights import set_weights
from medfed.federation.workflow import MeteredGrid
from medfed.models import build_unet
from medfed.plots import line_plot
from medfed.runs import RunDir

Scalar = bool | int | float | str
EVALUATION_FILE = "evaluation.jsonl"
MAX_TEXT = 200  # longest string a site may return (names and labels, never data)


def evaluation_due(cfg: RunConfig, server_round: int) -> bool:
    """Whether the sites evaluate after ``server_round``: every ``evaluation.every-rounds`` and after the last."""
    every = cfg.evaluation.every_rounds
    return every > 0 and (server_round % every == 0 or server_round == cfg.federation.rounds)


# ---------------------------------------------------------------------------------------------------- site side

@functools.lru_cache(maxsize=2)
def _network(cfg: RunConfig, device: str) -> FeatureNetwork:
    # One load per process: Ray actors evaluate many sites and rounds; the network is frozen.
    ev = cfg.evaluation
    return load_feature_network(ev.feature_network, inception_weights=ev.inception_weights,
                                allow_download=ev.allow_download, protocol=ev.protocol, device=device)


class _ByDigest:
    """Images hashed by their sha256, so a cache can key on them."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.digest = images, images_sha256(images)

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByDigest) and other.digest == self.digest


@functools.lru_cache(maxsize=8)
def _features(cfg: RunConfig, device: str, images: _ByDigest, source: str) -> FeatureSet:
    # A site's real images are the same every evaluation round: extract their features once per process.
    ev = cfg.evaluation
    return extract_features(_network(cfg, device), images.images, source=source, protocol=ev.protocol,
                            batch_size=ev.batch_size)


def site_test_data(cfg: RunConfig, node: NodeConfig, train: ImageDataset) -> tuple[ImageDataset, str]:
    """The site's own real test images and a label of what they are.

    Deployment: ``test-data-path`` in the node config, else the ``test`` split of the site's ``data-path``.
    Simulation: the site's shard of the ``test`` split. Without separate test images the training images are
    the reference, and the label says so (FID against train and against test are not comparable).
    """
    test_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split="test"))
    if node.test_data_path:
        node = dataclasses.replace(node, data_path=node.test_data_path)
    node = dataclasses.replace(node, policy=dataclasses.replace(node.policy, dataset_size=0))
    try:
        test = load_site(test_cfg, node).data
    except MedfedError:
        test = None
    if test is None or (len(test) == len(train) and torch.equal(test.images, train.images)):
        return train, "training images (the site has no separate test images)"
    return test, "test split"


def evaluate_at_site(generated: torch.Tensor, cfg: RunConfig, site: Site, test: ImageDataset,
                     reference: str) -> dict[str, Scalar]:
    """Score generated images (N, C, H, W) in [-1, 1] against the site's test images and audit them against its
    training images. Returns scalars only: the scores, and of the audit whether it passed and the near-copy
    count (see the module docstring for what they reveal)."""
    ev = cfg.evaluation
    device = str(resolve_device(cfg.train.device))
    network = _network(cfg, device)
    real = _features(cfg, device, _ByDigest(test.images), reference)
    fake = extract_features(network, generated, source="generated", protocol=ev.protocol, batch_size=ev.batch_size)
    metrics: dict[str, Scalar] = {
        "site": site.name, "feature-network": network.name, "protocol": ev.protocol, "reference": reference[:MAX_TEXT],
        "num-real": len(test), "num-generated": len(generated),
    }
    for score in compute_scores(real, fake, kid_subset_size=ev.kid_subset_size, prdc_k=ev.prdc_k,
                                seed=cfg.train.seed):
        if score.value is not None:
            metrics[score.metric] = score.value
            if score.std is not None:
                metrics[f"{score.metric}-std"] = score.std
    audit = audit_memorization(generated, site.data.images, reference_source=site.name,
                               threshold=ev.near_copy_threshold, max_fraction=ev.max_near_copy_fraction)
    metrics.update({"memorization-passed": audit["passed"], "near-copy-count": audit["near_copy_count"]})
    return metrics


def evaluation_seed(cfg: RunConfig, server_round: int) -> int:
    """The sampling seed of an evaluation round: the same at every site, fixed by the run config."""
    return cfg.train.seed * 1_000_003 + server_round


def sample_held_model(cfg: RunConfig, site: Site, run_id: int, server_round: int) -> torch.Tensor:
    """``evaluation.num-samples`` images from the global model the site received for training in this run.

    Raises:
        Refused: the site holds no global model of this run (it did not train in it).
    """
    held = held_global_model(site, run_id)
    if held is None:
        raise Refused(Reason.PROTOCOL, f"site {site.name}: no global model of run {run_id} to evaluate")
    device = resolve_device(cfg.train.device)
    model = build_unet(cfg.model.preset, site.data.image_shape[0], cfg.model.num_classes)
    set_weights(model, held.weights)
    return sample_images(model.to(device), cfg.diffusion, cfg.evaluation.num_samples, site.data.image_shape,
                         device=device, seed=evaluation_seed(cfg, server_round)).cpu()


def handle_evaluate(msg: Message, context: Context) -> Message:
    """The ClientApp's evaluate handler: legacy ``EvaluateIns`` in (the round only), numbers out."""
    ins = compat.recorddict_to_evaluateins(msg.content, keep_input=True)
    cfg = run_config_of(context)
    node = node_of(cfg, context.node_config)
    if not node.policy.share_evaluation:  # site_guard_mod refuses first; this keeps the handler safe on its own
        raise Refused(Reason.POLICY_SHARE_EVALUATION, "the site's policy does not share evaluation")
    server_round = int(ins.config["round"])
    try:
        site = load_site(cfg, node)
        generated = sample_held_model(cfg, site, context.run_id, server_round)
        test, reference = site_test_data(cfg, node, site.data)
        metrics = evaluate_at_site(generated, cfg, site, test, reference)
    except MedfedError as err:  # the message may name site files: it stays in the site's log
        log(ERROR, "site evaluation failed: %s", err)
        raise
    res = EvaluateRes(Status(Code.OK, "OK"), float(metrics["fid"]), len(test), metrics)
    return Message(compat.evaluateres_to_recorddict(res), reply_to=msg)


# -------------------------------------------------------------------------------------------------- server side

def numbers_only(content: RecordDict) -> str | None:
    """Why a site's evaluate reply is refused (it carries arrays, bytes or long text), or None if it is numbers."""
    if any(len(record) for record in content.array_records.values()):
        return "reply carries arrays"
    for record in content.config_records.values():
        for key, value in record.items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bytes) or (isinstance(item, str) and len(item) > MAX_TEXT):
                    return f"reply field '{key}' carries bytes or long text"
    return None


SUMMED = ("num-real",)
NOT_AVERAGED = ("near-copy-count",)


def weighted_means(sites: dict[str, dict[str, Scalar]], weights: dict[str, int]) -> list[dict[str, Any]]:
    """Example-weighted means of each numeric score over the sites that used the same feature network and protocol.

    Weights are each site's number of test images; this is a mean of per-site scores, not a pooled score.
    Returns one entry per (network, protocol): ``feature_network``, ``protocol``, ``sites`` and ``means``
    (``num-real`` summed, ``near-copy-count-max`` the worst site).
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for name, metrics in sites.items():
        groups.setdefault((str(metrics.get("feature-network")), str(metrics.get("protocol"))), []).append(name)
    out = []
    for (network, protocol), names in sorted(groups.items()):
        keys = {k for n in names for k, v in sites[n].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_AVERAGED}
        means: dict[str, float] = {}
        for key in sorted(keys):
            have = [n for n in names if isinstance(sites[n].get(key), (int, float))]
            total = sum(weights[n] for n in have)
            if key in SUMMED:
                means[key] = float(sum(cast(float, sites[n][key]) for n in have))
            elif total > 0:
                means[key] = sum(weights[n] * cast(float, sites[n][key]) for n in have) / total
        counts = [cast(float, sites[n]["near-copy-count"]) for n in names if "near-copy-count" in sites[n]]
        if counts:
            means["near-copy-count-max"] = max(counts)
        out.append({"feature_network": network, "protocol": protocol, "sites": sorted(names), "means": means})
    return out


@dataclass
class FederatedEvaluation:
    """Flower ``DefaultWorkflow``'s evaluate workflow: per-site scores of the global model's samples.

    Attributes:
        round_offset: rounds done before this run started (resume), so records carry the run's true round.
    """

    cfg: RunConfig
    run: RunDir
    image_shape: tuple[int, int, int]
    device: torch.device
    round_offset: int = 0

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        local_round = cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        server_round = self.round_offset + local_round
        if not evaluation_due(self.cfg, server_round):
            return
        self.evaluate(grid, server_round)

    def evaluate(self, grid: Grid, server_round: int) -> dict[str, Any]:
        start = time.perf_counter()
        ins = EvaluateIns(ndarrays_to_parameters([]), {"round": server_round})
        metered = MeteredGrid(grid)
        nodes = sorted(metered.get_node_ids())
        out = [Message(content=compat.evaluateins_to_recorddict(ins, True), dst_node_id=node,
                       message_type=MessageType.EVALUATE, group_id=f"evaluate-{server_round}") for node in nodes]
        replies = list(metered.send_and_receive(out, timeout=self.cfg.federation.round_timeout))
        sites: dict[str, dict[str, Scalar]] = {}
        weights_by_site: dict[str, int] = {}
        refused, declined, failures = {}, [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            if not msg.has_content():
                refusal = Refusal.find(msg.error.reason)
                if refusal is not None and refusal.reason == Reason.POLICY_SHARE_EVALUATION:
                    declined.append(refusal.site)
                else:
                    failures.append(f"{refusal.site}: {refusal.reason.value}" if refusal else f"node {node}: unreadable "
                                    "reply (see the server log)")
                    log(ERROR, "evaluation reply of node %s: %s", node, msg.error.reason[:300])
                continue
            why = numbers_only(msg.content)
            if why is not None:
                refused[f"node-{node}"] = why
                continue
            res = compat.recorddict_to_evaluateres(msg.content)
            if res.status.code == Code.EVALUATE_NOT_IMPLEMENTED:
                declined.append(f"node-{node}")
            elif res.status.code != Code.OK:
                failures.append(f"node {node}: {res.status.message}")
            else:
                name = str(res.metrics.get("site", f"node-{node}"))
                sites[name] = dict(res.metrics)
                weights_by_site[name] = res.num_examples
        answered = {m.metadata.src_node_id for m in replies}
        record: dict[str, Any] = {
            "round": server_round,
            "num_generated": self.cfg.evaluation.num_samples,
            "seed": evaluation_seed(self.cfg, server_round),
            "sites": sites,
            "weights": weights_by_site,
            "weighted": weighted_means(sites, weights_by_site),
            "memorization_passed": all(bool(m.get("memorization-passed")) for m in sites.values()) if sites else None,
            "declined": declined,
            "refused": refused,
            "failures": failures + [f"node {n}: no reply within {self.cfg.federation.round_timeout:g} s"
                                    for n in nodes if n not in answered],
            "privacy_note": "per-site statistics computed on private data outside the DP guarantee",
            "bytes_down": metered.bytes_down,
            "bytes_up": metered.bytes_up,
            "wall_s": time.perf_counter() - start,
        }
        append_record(self.run, record)
        plot_evaluation(self.run)
        return record


def append_record(run: RunDir, record: dict[str, Any]) -> Path:
    """Append one round's evaluation to ``evaluation.jsonl``."""
    path = run.root / EVALUATION_FILE
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    return path


def read_records(run: RunDir) -> list[dict[str, Any]]:
    path = run.root / EVALUATION_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_evaluation(run: RunDir) -> Path | None:
    """``evaluation.png``: each site's FID and near-copy count against the round."""
    records = read_records(run)
    if not records:
        return None
    panels = []
    for metric, label in (("fid", "FID (per site, own test images)"), ("near-copy-count", "near-copy count")):
        series: dict[str, tuple[list[float], list[float]]] = {}
        for r in records:
            for site, m in r["sites"].items():
                if metric in m:
                    xs, ys = series.setdefault(site, ([], []))
                    xs.append(r["round"])
                    ys.append(m[metric])
        panels.append((label, metric, series))
    return line_plot(panels, run.root / "evaluation.png", xlabel="round")
