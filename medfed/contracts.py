"""The typed contracts at medfed's process boundaries, shared by both ends.

Three things cross a process boundary in a federated run, and each has one type here:

- :class:`NodeConfig`: what a site tells its own ClientApp (Flower's ``--node-config`` in a deployment, the
  simulation's per-node dict), including the hospital's :class:`SitePolicy`. Written by ``site.toml``
  (:mod:`medfed.deploy.sitecfg`) or the simulation, read only through :meth:`NodeConfig.from_flower`.
- :class:`Refusal`: the only thing a site says when it does not take part in a round: a fixed reason code and
  the fixed text of that code, never exception text, file paths, losses or counts (details stay in the site's
  own log).
- :class:`RoundRecord`: one line of a run's ``metrics.jsonl``, written by the server and read by the CLI, the
  privacy report, the studies and the benchmarks.

Each carries a version; a reader refuses a version it does not know. Nothing here imports torch or Flower.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from medfed.errors import ConfigError

Scalar = bool | int | float | str

CONTRACT_VERSION = 1
"""Version of the node-config, refusal and round-record formats below."""

_NODE_VERSION = "medfed-node-config"
"""The node config's key holding its :data:`CONTRACT_VERSION`."""
_REPLY_VERSION = "medfed-reply"
"""The site reply's metric holding its :data:`CONTRACT_VERSION`."""


# --------------------------------------------------------------------------------------------------- policy

@dataclass(frozen=True)
class SitePolicy:
    """A hospital's own rules for every round it takes part in. The site enforces them, whatever the run says.

    Defaults are the strict ones. A run whose config or messages break a rule is refused before the site
    loads any data (:func:`medfed.federation.policy.check_run`), with the rule's :class:`Reason` code.

    Attributes:
        require_dp: train only with DP-SGD (``privacy.enabled`` must be true).
        require_secure_aggregation: send updates only through SecAgg+ (plain fit messages are refused).
        delta: the delta of every (epsilon, delta) statement about this site; the run's ``privacy.delta`` must
            equal it (a larger delta makes the same training look cheaper). 0 = not set (simulation only:
            the run's delta is used and said so).
        min_sites_per_round: fewest sites a round may aggregate over (SecAgg+'s sample size); at 2 each site
            learns the other's update from the next global model.
        share_evaluation: answer the coordinator's federated evaluation (scores of the global model's samples
            against this site's images; outside the DP guarantee).
        dataset_size: the number of training images the site declares public. The sample rate, step count,
            DP-SGD normaliser and FedAvg weight depend only on it, never on the exact private count (which may
            differ: the site trains the declared mechanism anyway and logs the difference locally). 0 = not
            declared (simulation: the shard's own count; deployment: NOT PRIVATE runs only).
        max_run_epsilon: the largest ``privacy.target-epsilon`` a run may plan for; 0 = only the cap bounds it.
        min_noise_multiplier: the smallest DP-SGD noise multiplier the site accepts; 0 = no floor.
    """

    require_dp: bool = True
    require_secure_aggregation: bool = True
    delta: float = 0.0
    min_sites_per_round: int = 3
    share_evaluation: bool = False
    dataset_size: int = 0
    max_run_epsilon: float = 0.0
    min_noise_multiplier: float = 0.0

    def validate(self, source: str) -> SitePolicy:
        """Range checks; raises :class:`ConfigError` naming ``source`` and the key."""
        checks = [
            (0 <= self.delta < 1, "delta", "must be in (0, 1)"),
            (self.min_sites_per_round >= 1, "min-sites-per-round", "must be >= 1"),
            (self.dataset_size >= 0, "dataset-size", "must be >= 0"),
            (self.max_run_epsilon >= 0 and math.isfinite(self.max_run_epsilon), "max-run-epsilon",
             "must be a finite number >= 0 (0 = no limit beyond the cap)"),
            (self.min_noise_multiplier >= 0, "min-noise-multiplier", "must be >= 0"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise ConfigError(f"{source}: 'policy.{key}' {why}")
        return self

    def relaxed(self) -> list[str]:
        """The rules this policy relaxes from the strict defaults, as ``policy.key = value`` strings."""
        strict = SitePolicy()
        return [f"policy.{_key(f.name)} = {getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                if f.name in ("require_dp", "require_secure_aggregation", "min_sites_per_round")
                and getattr(self, f.name) != getattr(strict, f.name)]

    @classmethod
    def from_keys(cls, values: Mapping[str, object], source: str, prefix: str = "policy.") -> SitePolicy:
        """A checked policy from its hyphenated keys (``dataset-size = 1200``; a missing key keeps its default).

        ``source`` (a file, or ``node config``) and ``prefix`` + key name the key in every :class:`ConfigError`:
        an unknown key, a value of the wrong type, a value out of range (:meth:`validate`). ``site.toml``'s
        ``[policy]`` table and the node config's ``policy-*`` keys are both read here."""
        return cls(**_typed_fields(cls, values, source, prefix)).validate(source)


def _key(name: str) -> str:
    return name.replace("_", "-")


def _require_version(found: object, what: str, key: str, advice: str = "", if_missing: str = "") -> None:
    """Refuse a contract whose version (the value of ``key``) is missing or not :data:`CONTRACT_VERSION`.

    Raises:
        ConfigError: ``<what> has no contract version ('<key>')`` or ``<what> version <found> is not supported
            (this medfed reads version N)``, each followed by ``: <advice>`` (``if_missing`` for the first, when
            given)."""
    if found is None:
        why = if_missing or advice
        raise ConfigError(f"{what} has no contract version ('{key}')" + (f": {why}" if why else ""))
    if not isinstance(found, int) or isinstance(found, bool) or found != CONTRACT_VERSION:
        raise ConfigError(f"{what} version {found!r} is not supported (this medfed reads version "
                          f"{CONTRACT_VERSION})" + (f": {advice}" if advice else ""))


_TYPES: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}


def _typed_fields(cls: type, values: Mapping[str, object], where: str, prefix: str = "",
                  unknown: str = "key") -> dict[str, Any]:
    """The keyword arguments of dataclass ``cls`` from ``values`` keyed by hyphenated field names, each checked
    against its field's scalar type (``bool``, ``int``, ``float``, ``str``, or one of them ``| None``).

    Fields of other types are not read (they are no key). Errors name ``where`` and ``prefix`` + the key.

    Raises:
        ConfigError: an unknown key (``<where>: unknown <unknown> '<key>'``), a missing key of a field without a
            default, or a value of the wrong type."""
    fields = {_key(f.name): (f, _TYPES[scalar]) for f in dataclasses.fields(cls)
              if (scalar := str(f.type).split(" | ")[0]) in _TYPES}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown {unknown} '{prefix}{key}'")
        f, kind = fields[key]
        kwargs[f.name] = _typed(value, kind, f"{where}: '{prefix}{key}'")
    for key, (f, _) in fields.items():
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing {unknown} '{prefix}{key}'")
    return kwargs


def _typed(value: object, kind: type, what: str) -> Scalar:
    """``value`` as ``kind`` (an int is a float; 'true'/'false' a bool), else a :class:`ConfigError` naming
    ``what``."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{what} must be {kind.__name__}, got {value!r}")


# ---------------------------------------------------------------------------------------------- node config

@dataclass(frozen=True)
class NodeConfig:
    """What a site's ClientApp knows about its own site: Flower's node config, typed.

    Deployment (``medfed site start`` from ``site.toml``): ``data_path`` and ``state_dir`` are set.
    Simulation: ``partition_id`` of ``num_partitions`` selects a shard; the policy comes from the run's
    ``policy.*`` keys (the simulated hospitals' rules), the cap from ``privacy.site-cap-epsilon``.

    Attributes:
        site_name: the site's display name in the coordinator's records.
        data_path: file or folder of the site's training images ('' in simulation).
        data_format: medfed dataset name of ``data_path`` ('' = the run's ``data.dataset``).
        test_data_path: the site's held-out images for federated evaluation ('' = the dataset's test split).
        state_dir: the site's private folder (privacy ledger, signing key, decoded-data cache).
        cap_epsilon: the hospital's total epsilon over all runs (0 = not set: simulation uses the run's cap).
        policy: the site's rules (:class:`SitePolicy`).
        partition_id: simulation only: which shard (-1 in deployment).
        num_partitions: simulation only: how many shards.
    """

    site_name: str = ""
    data_path: str = ""
    data_format: str = ""
    test_data_path: str = ""
    state_dir: str = ""
    cap_epsilon: float = 0.0
    policy: SitePolicy = field(default_factory=SitePolicy)
    partition_id: int = -1
    num_partitions: int = 0

    @staticmethod
    def name_in(values: Mapping[str, Scalar]) -> str:
        """The site's display name from a node config that may not parse (for a refusal about that)."""
        name = values.get("site-name")
        return str(name) if name else f"site-{values.get('partition-id', '?')}"

    @property
    def deployed(self) -> bool:
        """A real hospital site (its own data path), not a simulated shard."""
        return bool(self.data_path)

    def to_flower(self) -> dict[str, Scalar]:
        """The flat ``--node-config`` form (``key = value`` pairs; policy keys prefixed ``policy-``)."""
        out: dict[str, Scalar] = {_NODE_VERSION: CONTRACT_VERSION}
        for f in dataclasses.fields(self):
            if f.name == "policy":
                continue
            out[_key(f.name)] = getattr(self, f.name)
        for f in dataclasses.fields(self.policy):
            out[f"policy-{_key(f.name)}"] = getattr(self.policy, f.name)
        return out

    @classmethod
    def from_flower(cls, values: Mapping[str, Scalar]) -> NodeConfig:
        """Parse Flower's node config. Flower's own keys ``partition-id``/``num-partitions`` (simulation) are
        read too. Unknown keys, bad types and an unknown version raise :class:`ConfigError` naming the key."""
        _require_version(values.get(_NODE_VERSION, CONTRACT_VERSION if "partition-id" in values else None),
                         "node config", _NODE_VERSION, advice="update medfed at the site or the coordinator",
                         if_missing="start the site with `medfed site start` (it writes the node config from "
                                    "site.toml)")
        own = {k: v for k, v in values.items() if k != _NODE_VERSION and not k.startswith("policy-")}
        policy = {k.removeprefix("policy-"): v for k, v in values.items() if k.startswith("policy-")}
        return cls(**_typed_fields(cls, own, "node config"),
                   policy=SitePolicy.from_keys(policy, "node config", prefix="policy-"))


# ------------------------------------------------------------------------------------------------- refusals

class Reason(StrEnum):
    """Why a site did not take part in a round, or why the server did not use its reply.

    The value is the code that crosses the network; :data:`REASON_TEXT` holds the one fixed message of each.
    """

    POLICY_REQUIRE_DP = "policy.require-dp"
    POLICY_REQUIRE_SECURE_AGGREGATION = "policy.require-secure-aggregation"
    POLICY_DELTA = "policy.delta"
    POLICY_MIN_SITES = "policy.min-sites-per-round"
    POLICY_MAX_RUN_EPSILON = "policy.max-run-epsilon"
    POLICY_MIN_NOISE = "policy.min-noise-multiplier"
    POLICY_SHARE_EVALUATION = "policy.share-evaluation"
    PRIVACY_CAP = "privacy-cap"
    LEDGER = "ledger"
    DATA_ERROR = "data-error"
    CONFIG_ERROR = "config-error"
    INTERNAL_ERROR = "internal-error"
    PROTOCOL = "protocol"
    # Server-side outcomes (never sent by a site)
    INVALID_UPDATE = "invalid-update"
    NO_REPLY = "no-reply"
    UNKNOWN = "unknown"


REASON_TEXT: dict[Reason, str] = {
    Reason.POLICY_REQUIRE_DP: "the site's policy requires DP-SGD and the run has privacy.enabled = false",
    Reason.POLICY_REQUIRE_SECURE_AGGREGATION: "the site's policy requires secure aggregation (SecAgg+) and the "
                                               "round is not securely aggregated",
    Reason.POLICY_DELTA: "the run's privacy.delta differs from the delta in the site's policy",
    Reason.POLICY_MIN_SITES: "the round has fewer sites than the site's policy minimum (min-sites-per-round)",
    Reason.POLICY_MAX_RUN_EPSILON: "the run's privacy.target-epsilon is above the site's max-run-epsilon",
    Reason.POLICY_MIN_NOISE: "the run's noise multiplier is below the site's min-noise-multiplier",
    Reason.POLICY_SHARE_EVALUATION: "the site's policy does not share evaluation (share-evaluation = false)",
    Reason.PRIVACY_CAP: "the round would exceed the site's privacy cap",
    Reason.LEDGER: "the site's privacy ledger failed verification or no longer extends the coordinator's anchor",
    Reason.DATA_ERROR: "the site's data could not be loaded",
    Reason.CONFIG_ERROR: "the run's configuration is not usable at this site",
    Reason.INTERNAL_ERROR: "the site failed while training",
    Reason.PROTOCOL: "the site refused a secure-aggregation message that breaks the protocol",
    Reason.INVALID_UPDATE: "the update was not a finite delta of the model's shape",
    Reason.NO_REPLY: "no reply before the round's timeout",
    Reason.UNKNOWN: "the reply could not be read",
}

_REFUSAL_TAG = "medfed-refusal"
_REFUSAL_RE = re.compile(_REFUSAL_TAG + r"/(\d+) site=([^\s]+) code=([a-z.-]+)")


@dataclass(frozen=True)
class Refusal:
    """A site's refusal as it crosses the network: site name and reason code only.

    Encoded into the reason string of Flower's error reply (:meth:`encode`); the server finds it in whatever
    text Flower wraps around it (:meth:`find`)."""

    site: str
    reason: Reason

    @property
    def text(self) -> str:
        return REASON_TEXT[self.reason]

    def encode(self) -> str:
        site = re.sub(r"\s", "_", self.site) or "?"
        return f"{_REFUSAL_TAG}/{CONTRACT_VERSION} site={site} code={self.reason.value}"

    @classmethod
    def find(cls, text: str) -> Refusal | None:
        """The refusal encoded in ``text``, or None if there is none (or of an unknown version or code)."""
        match = _REFUSAL_RE.search(text)
        if match is None or int(match.group(1)) != CONTRACT_VERSION:
            return None
        try:
            return cls(site=match.group(2), reason=Reason(match.group(3)))
        except ValueError:
            return None


# ----------------------------------------------------------------------------------------------- site reply

@dataclass(frozen=True)
class SiteReply:
    """The metrics of a site's training reply (Flower ``FitRes.metrics``), as both ends read them.

    Everything here is computed from public values (the site's declared dataset size, the run's batch size,
    noise multiplier and steps) except ``train_loss`` and ``seconds``, which a site sends only in a NOT PRIVATE
    run (nothing is covered there anyway); a private site keeps them in its own log.
    """

    site: str
    private: bool
    steps: int
    epsilon: float | None = None
    delta: float | None = None
    cap_epsilon: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    max_grad_norm: float | None = None
    noise_multiplicity: int | None = None
    accountant: str | None = None
    ledger_count: int | None = None
    """Entries in the site's privacy ledger after a private round (with ``ledger_hash``: its head, the entry the
    round committed, for the coordinator's anchor; the count says how many rounds and refusals the site recorded,
    nothing of its data). None in NOT PRIVATE rounds, which leave the ledger as it was."""
    ledger_hash: str | None = None
    train_loss: float | None = None
    seconds: float | None = None

    def to_metrics(self) -> dict[str, Scalar]:
        out: dict[str, Scalar] = {_REPLY_VERSION: CONTRACT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[_key(f.name)] = value
        return out

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Scalar]) -> SiteReply:
        """Parse a reply's metrics; raises :class:`ConfigError` for a reply of another version or shape."""
        _require_version(metrics.get(_REPLY_VERSION), "site reply", _REPLY_VERSION)
        return cls(**_typed_fields(cls, {k: v for k, v in metrics.items() if k != _REPLY_VERSION}, "site reply",
                                   unknown="metric"))


# ------------------------------------------------------------------------------------------------ fit config

@dataclass(frozen=True)
class FitConfig:
    """What the coordinator tells every site with a round's global model (Flower ``FitIns.config``).

    Attributes:
        round: the run's round number.
        anchors: per site name, the head ``(entry count, last hash)`` of its privacy ledger the coordinator
            recorded last (deployments keep them in ``anchors.json``). A site refuses to train when its ledger no
            longer extends its own (:data:`Reason.LEDGER`).
    """

    round: int
    anchors: Mapping[str, tuple[int, str]] = field(default_factory=dict)

    def to_config(self) -> dict[str, Scalar]:
        out: dict[str, Scalar] = {"round": self.round}
        if self.anchors:
            out["ledger-anchors"] = json.dumps({k: list(v) for k, v in sorted(self.anchors.items())})
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Scalar]) -> FitConfig:
        try:
            anchors = {str(k): (int(v[0]), str(v[1]))
                       for k, v in json.loads(str(config.get("ledger-anchors", "{}"))).items()}
            return cls(round=int(config["round"]), anchors=anchors)
        except (KeyError, ValueError, TypeError, IndexError) as err:
            raise ConfigError(f"fit instructions are malformed ({err})") from None


# -------------------------------------------------------------------------------------------- round records

class Status(StrEnum):
    """What became of one site in a round."""

    TRAINED = "trained"
    """Its update was aggregated (or would have been, had the round completed)."""
    REFUSED = "refused"
    """The site declined (a policy rule, its cap, its ledger, its data)."""
    REJECTED = "rejected"
    """The server refused the site's update."""
    MISSING = "missing"
    """Sampled, but neither an update nor a readable refusal arrived."""


@dataclass(frozen=True)
class SiteOutcome:
    """One site in one round, as the coordinator records it."""

    site: str
    status: Status
    reason: Reason | None = None
    epsilon: float | None = None
    """The site's epsilon after the round, from its own accountant (computed from public values only: its
    declared dataset size, batch size, noise multiplier and steps)."""
    cap_epsilon: float | None = None
    delta: float | None = None

    @property
    def reason_text(self) -> str:
        return REASON_TEXT[self.reason] if self.reason else ""

    def to_dict(self) -> dict[str, Any]:
        d = {"site": self.site, "status": self.status.value}
        if self.reason is not None:
            d["reason"] = self.reason.value
        for name in ("epsilon", "cap_epsilon", "delta"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SiteOutcome:
        return cls(site=str(d["site"]), status=Status(d["status"]),
                   reason=Reason(d["reason"]) if d.get("reason") else None,
                   epsilon=d.get("epsilon"), cap_epsilon=d.get("cap_epsilon"), delta=d.get("delta"))


@dataclass(frozen=True)
class RoundRecord:
    """One federated round as the coordinator records it (a line of ``metrics.jsonl``).

    With secure aggregation the record holds no per-site value from the site's update or its training (loss,
    timing, example count, update statistics): only who took part, who refused and why, and the epsilon each
    site's accountant computed from public values. Without it (a NOT PRIVATE or insecure run the sites'
    policies allowed), ``train_loss`` and ``site_seconds`` carry what the sites reported.
    """

    round: int
    aggregated: bool
    sites: tuple[SiteOutcome, ...]
    privacy: str
    wall_s: float
    bytes_down: int = 0
    bytes_up: int = 0
    secure_aggregation: Mapping[str, float | int] | None = None
    weights: Mapping[str, float] = field(default_factory=dict)
    """Each site's FedAvg weight: its declared (public) dataset size."""
    train_loss: Mapping[str, float] = field(default_factory=dict)
    site_seconds: Mapping[str, float] = field(default_factory=dict)
    skipped: str = ""
    """Why the round aggregated nothing ('' when it did)."""
    version: int = CONTRACT_VERSION

    def of(self, status: Status) -> list[SiteOutcome]:
        return [s for s in self.sites if s.status == status]

    @property
    def participants(self) -> list[str]:
        return sorted(s.site for s in self.of(Status.TRAINED))

    @property
    def epsilon(self) -> dict[str, float]:
        return {s.site: s.epsilon for s in self.sites if s.epsilon is not None}

    def summary_line(self) -> str:
        """One console line: the round, who trained, who refused or failed and why."""
        parts = [f"round {self.round}: " + ("aggregated" if self.aggregated else "NOT aggregated"),
                 f"trained: {', '.join(self.participants) or 'none'}"]
        others = [s for s in self.sites if s.status != Status.TRAINED]
        if others:
            parts.append("; ".join(f"{s.site} {s.status.value} ({s.reason.value if s.reason else '?'}: "
                                   f"{s.reason_text})" for s in others))
        if self.skipped:
            parts.append(self.skipped)
        return " | ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": "round", "version": self.version, "round": self.round, "aggregated": self.aggregated,
             "sites": [s.to_dict() for s in self.sites], "privacy": self.privacy, "wall_s": self.wall_s,
             "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
             "secure_aggregation": dict(self.secure_aggregation) if self.secure_aggregation else None,
             "weights": dict(self.weights), "train_loss": dict(self.train_loss),
             "site_seconds": dict(self.site_seconds)}
        if self.skipped:
            d["skipped"] = self.skipped
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundRecord:
        _require_version(d.get("version"), "round record", "version", advice="written by another medfed version")
        return cls(round=int(d["round"]), aggregated=bool(d["aggregated"]),
                   sites=tuple(SiteOutcome.from_dict(s) for s in d["sites"]), privacy=str(d["privacy"]),
                   wall_s=float(d["wall_s"]), bytes_down=int(d.get("bytes_down", 0)),
                   bytes_up=int(d.get("bytes_up", 0)), secure_aggregation=d.get("secure_aggregation"),
                   weights=d.get("weights", {}), train_loss=d.get("train_loss", {}),
                   site_seconds=d.get("site_seconds", {}), skipped=d.get("skipped", ""))


def round_records(lines: Iterable[Mapping[str, Any]]) -> list[RoundRecord]:
    """The round records among a run's ``metrics.jsonl`` lines (other kinds, e.g. the start event, skipped)."""
    return [RoundRecord.from_dict(line) for line in lines if line.get("kind") == "round"]


def dumps(record: RoundRecord) -> str:
    return json.dumps(record.to_dict(), sort_keys=True)
