"""A hospital site's configuration file (``site.toml``): the one place a site sets what it shares and spends.

Example (``medfed site init`` writes it; paths are relative to the file's folder unless absolute)::

    name = "hospital-a"                          # display name in the coordinator's metrics
    superlink = "coordinator.example.org:9092"   # the only address the site connects to (outbound)
    ca-cert = "ca.crt"                           # the coordinator's CA certificate (TLS trust anchor)
    private-key = "site-key"                     # the site's authentication key (0600, never leaves the site)
    runtime-port = 9094                          # local port of the SuperNode's runtime API (127.0.0.1 only)

    [data]
    path = "/data/ultrasound"                    # the site's images (read at the site only)
    format = "folder"                            # a medfed dataset name: npz, folder, dicom, nifti, ...

    [privacy]
    cap-epsilon = 10.0                           # total epsilon the hospital allows, over all runs
    state-dir = "state"                          # the privacy ledger lives here (0700)

    [policy]                                     # the site's rules: checked before any data is loaded
    delta = 1e-5                                 # required; every run's privacy.delta must equal it
    dataset-size = 1200                          # required for DP runs: the image count, declared public
    require-dp = true                            # refuse runs without DP-SGD
    require-secure-aggregation = true            # refuse rounds that are not masked by SecAgg+
    min-sites-per-round = 3                      # refuse rounds over fewer sites
    share-evaluation = false                     # answer federated evaluation (outside the DP guarantee)
    max-run-epsilon = 0.0                        # largest target epsilon a run may plan (0: cap only)
    min-noise-multiplier = 0.0                   # smallest DP-SGD noise multiplier accepted (0: no floor)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from medfed.contracts import NodeConfig, SitePolicy
from medfed.datasets import DATASETS
from medfed.errors import ConfigError

SITE_FILE = "site.toml"
Scalar = bool | int | float | str


@dataclass(frozen=True)
class SiteConfig:
    """A site's settings, with every path absolute.

    Attributes:
        name: display name (``site-name`` in the node config); shows in the coordinator's per-round metrics.
        superlink: ``host:port`` of the coordinator's SuperLink.
        ca_cert: PEM certificate of the coordinator's CA; the SuperLink's certificate must chain to it.
        private_key: the site's OpenSSH-format ECDSA private key (``--auth-supernode-private-key``).
        data_path: file or folder of the site's images.
        data_format: medfed dataset name of ``data_path``.
        state_dir: site-private folder; its privacy ledger is ``<state_dir>/privacy-ledger.jsonl``.
        cap_epsilon: the hospital's privacy cap (epsilon over all runs), at ``policy.delta``.
        policy: the site's rules (:class:`medfed.contracts.SitePolicy`); ``policy.delta`` is required.
        runtime_port: local port of the SuperNode's runtime API (distinct per SuperNode on one host).
    """

    name: str
    superlink: str
    ca_cert: Path
    private_key: Path
    data_path: Path
    data_format: str
    state_dir: Path
    cap_epsilon: float
    policy: SitePolicy = field(default_factory=lambda: SitePolicy(delta=1e-5))
    runtime_port: int = 9094

    def node(self) -> NodeConfig:
        """The site's typed node config (what its ClientApp reads)."""
        return NodeConfig(site_name=self.name, data_path=str(self.data_path), data_format=self.data_format,
                          state_dir=str(self.state_dir), cap_epsilon=self.cap_epsilon, policy=self.policy)

    def node_config(self) -> dict[str, Scalar]:
        """The SuperNode's ``--node-config``: :meth:`node` in Flower's flat form."""
        return self.node().to_flower()


def validate_site(cfg: SiteConfig, source: str) -> SiteConfig:
    """Range checks; raises :class:`ConfigError` naming ``source`` and the key."""
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: '{key}' {why}")

    if not cfg.name.strip() or any(c in cfg.name for c in "\"'\\\n"):
        raise bad("name", "must be a non-empty name without quotes, backslashes or newlines")
    host, sep, port = cfg.superlink.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise bad("superlink", f"must be host:port, got '{cfg.superlink}'")
    if cfg.data_format not in DATASETS:
        raise bad("data.format", f"'{cfg.data_format}' is not one of {', '.join(DATASETS)}")
    if not (cfg.cap_epsilon > 0 and math.isfinite(cfg.cap_epsilon)):
        raise bad("privacy.cap-epsilon", "must be a finite number > 0")
    cfg.policy.validate(source)
    if cfg.policy.delta <= 0:
        raise bad("policy.delta", "is required: the delta of every (epsilon, delta) statement about this site, "
                  "e.g. 1e-5 (well below 1 / images)")
    if not 0 < cfg.runtime_port < 65536:
        raise bad("runtime-port", "must be a TCP port (1-65535)")
    return cfg


def to_toml(cfg: SiteConfig, folder: Path) -> str:
    """The file text; paths inside ``folder`` are written relative to it, so the folder can move."""
    def rel(path: Path) -> str:
        try:
            return str(path.relative_to(folder))
        except ValueError:
            return str(path)

    doc: dict[str, Any] = {"name": cfg.name, "superlink": cfg.superlink, "ca-cert": rel(cfg.ca_cert),
                           "private-key": rel(cfg.private_key), "runtime-port": cfg.runtime_port,
                           "data": {"path": str(cfg.data_path), "format": cfg.data_format},
                           "privacy": {"cap-epsilon": cfg.cap_epsilon, "state-dir": rel(cfg.state_dir)},
                           "policy": {f.name.replace("_", "-"): getattr(cfg.policy, f.name)
                                      for f in dataclasses.fields(cfg.policy)}}
    return "# medfed site configuration (see docs/deployment.md)\n" + tomli_w.dumps(doc)


def write_site_config(cfg: SiteConfig, path: Path) -> Path:
    validate_site(cfg, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(cfg, path.parent.resolve()))
    return path


def site_config_path(site: Path) -> Path:
    """``site`` is a site folder (holding ``site.toml``) or the file itself."""
    site = Path(site).expanduser()
    return site / SITE_FILE if site.is_dir() else site


def read_site_config(site: Path) -> SiteConfig:
    """Read and check a site's configuration; relative paths are resolved against the file's folder.

    Raises:
        ConfigError: missing file, bad TOML, unknown or missing keys, values out of range (naming the key).
    """
    path = site_config_path(site)
    if not path.is_file():
        raise ConfigError(f"{path}: no site configuration (create one with `medfed site init`)")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    folder = path.parent.resolve()
    policy_keys = {f.name.replace("_", "-") for f in dataclasses.fields(SitePolicy)}
    expected = {"": {"name", "superlink", "ca-cert", "private-key", "runtime-port", "data", "privacy", "policy"},
                "data": {"path", "format"}, "privacy": {"cap-epsilon", "state-dir"}, "policy": policy_keys}
    if "cap-delta" in doc.get("privacy", {}):
        raise ConfigError(f"{path}: 'privacy.cap-delta' moved to 'policy.delta' (required): the run's "
                          "privacy.delta must equal it")
    for table, keys in expected.items():
        values = doc if not table else doc.get(table, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: '{table}' must be a table")
        unknown = set(values) - keys
        if unknown:
            key = sorted(unknown)[0]
            close = difflib.get_close_matches(key, sorted(keys), n=1)
            hint = f" (did you mean '{(table + '.') if table else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}: unknown key '{(table + '.') if table else ''}{key}'{hint}")
    if "delta" not in doc.get("policy", {}):
        raise ConfigError(f"{path}: missing key 'policy.delta' (the delta of every (epsilon, delta) statement "
                          "about this site, e.g. 1e-5)")

    def get(key: str, kind: type, default: object = ...) -> Any:
        table, _, name = key.rpartition(".")
        value = (doc.get(table, {}) if table else doc).get(name, default)
        if value is ...:
            raise ConfigError(f"{path}: missing key '{key}'")
        if value is not None and kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None and not isinstance(value, kind):
            raise ConfigError(f"{path}: '{key}' must be {kind.__name__}, got {value!r}")
        return value

    def resolve(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else folder / p

    cfg = SiteConfig(name=get("name", str), superlink=get("superlink", str), ca_cert=resolve(get("ca-cert", str)),
                     private_key=resolve(get("private-key", str)), data_path=resolve(get("data.path", str)),
                     data_format=get("data.format", str), state_dir=resolve(get("privacy.state-dir", str)),
                     cap_epsilon=get("privacy.cap-epsilon", float),
                     policy=SitePolicy.from_keys(doc.get("policy", {}), str(path)),
                     runtime_port=get("runtime-port", int, 9094))
    return validate_site(cfg, str(path))
