"""Train-on-synthetic, test-on-real (TSTR) utility: can a model trained on the generated images classify real ones?

One fixed recipe, never tuned on the test split: the domain classifier's small CNN
(:class:`medfed.evaluation.classifier.DomainClassifier`: three 3x3 conv stages of 16/32/64 channels with ReLU and
2x2 max-pooling after the first two, 4x4 average pooling, a 128-unit embedding, dropout 0.2, a linear class head)
trained by :func:`medfed.evaluation.classifier.train_classifier` from a seeded initialisation with AdamW
(lr 1e-3, weight decay 1e-4), batch 64, :data:`RECIPE` ``epochs`` epochs, no augmentation, at the real test
images' channels and size. The same recipe trained on as many real training images gives the baseline beside it.

Reported on the real test split: accuracy, balanced accuracy (mean recall over the classes present in the test
split) and, for two-class tasks, the ROC AUC of the class-1 probability.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.classification import binary_auroc

from medfed.datasets import NO_LABEL, ImageDataset, convert_channels, resize
from medfed.errors import DatasetError


@dataclass(frozen=True)
class UtilityRecipe:
    """How the TSTR classifier is trained (fixed; recorded in every result)."""

    network: str = "medfed DomainClassifier (width 16, 128 features)"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "AdamW (weight decay 1e-4)"
    augmentation: str = "none"


RECIPE = UtilityRecipe()
"""The one recipe. ``epochs`` was fixed on MNIST: 1,000 training images, accuracy on 5,000 other *training* images
(5 epochs: 0.807, 10: 0.912, 20: 0.933), never on a test split."""


@torch.no_grad()
def class_probabilities(network: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, K) softmax probabilities of a trained :class:`DomainClassifier` for (N, C, H, W) images in [-1, 1]."""
    network.eval()
    device = next(network.parameters()).device
    return torch.cat([network.logits_of(images[s:s + batch_size].to(device)).float().softmax(1).cpu()
                      for s in range(0, len(images), batch_size)])


def classification_scores(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """Accuracy, balanced accuracy and (two classes) ROC AUC of (N, K) ``probabilities`` for (N,) ``labels``.

    Balanced accuracy is the mean recall over the classes present in ``labels``. ``auc`` is None unless K = 2
    and both classes occur in ``labels``.
    """
    predicted = probabilities.argmax(1)
    correct = (predicted == labels).float()
    present = labels.unique()
    recalls = torch.stack([correct[labels == c].mean() for c in present])
    auc = None
    if probabilities.shape[1] == 2 and len(present) == 2:
        auc = float(binary_auroc(probabilities[:, 1], labels))
    return {"accuracy": float(correct.mean()), "balanced_accuracy": float(recalls.mean()), "auc": auc}


def check_labels(labels: torch.Tensor, num_classes: int, source: str) -> None:
    """Raise DatasetError naming ``source`` unless every label is a class index in [0, num_classes)."""
    if len(labels) == 0:
        raise DatasetError(f"{source}: no images")
    if bool((labels == NO_LABEL).any()):
        missing = int((labels == NO_LABEL).sum())
        raise DatasetError(f"{source}: {missing} of {len(labels)} images have no class label; TSTR needs a label "
                           "per image")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise DatasetError(f"{source}: labels span {int(labels.min())}..{int(labels.max())}, outside the real test "
                           f"split's {num_classes} classes 0..{num_classes - 1}")


def train_and_score(images: torch.Tensor, labels: torch.Tensor, test: ImageDataset, *, num_classes: int,
                    source: str, seed: int = 0, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Train the :data:`RECIPE` classifier on (N, C, H, W) ``images`` in [-1, 1] with (N,) int64 ``labels`` and
    score it on ``test``. Images are converted to the test images' channels and size first.

    Returns:
        ``{"source", "num_images", "class_counts", "classifier_sha256", **classification_scores}``.
    """
    from medfed.evaluation.classifier import train_classifier

    check_labels(labels, num_classes, source)
    c, h, _ = test.image_shape
    train = ImageDataset(resize(convert_channels(images.float(), c), h).contiguous(), labels.long().cpu(), source)
    # The head gets the test split's classes (train_classifier takes the larger label range of the two sets).
    network = train_classifier(train, test, dataset=source, epochs=RECIPE.epochs, batch_size=RECIPE.batch_size,
                               lr=RECIPE.lr, seed=seed, device=device, show_progress=False)
    scores = classification_scores(class_probabilities(network, test.images), test.labels)
    counts = torch.bincount(train.labels, minlength=num_classes).tolist()
    return {"source": source, "num_images": len(train), "class_counts": counts,
            "classifier_sha256": network.info["sha256"], **scores}


def utility_report(images: torch.Tensor, labels: torch.Tensor, test: ImageDataset, *,
                   real_train: ImageDataset | None = None, source: str = "generated", seed: int = 0,
                   device: torch.device | str = "cpu") -> dict[str, Any]:
    """TSTR of the labelled generated ``images``/``labels`` on the real ``test`` split, beside the same classifier
    trained on as many real training images (a seeded random draw from ``real_train``) when it is given.

    Args:
        images: (N, C, H, W) float generated images in [-1, 1]; converted to the test images' channels and size.
        labels: (N,) int64 class of each generated image, in [0, K) for the test split's K classes.
        test: the real test split, every image labelled.
        real_train: real training images for the baseline (at least N), or None to skip it.
        source: what ``images`` are (a folder, a checkpoint), for the report.
        seed: seeds the classifiers' initialisation and batch order, and the baseline's draw.

    Returns:
        The JSON-ready report: ``recipe``, ``test``, ``synthetic`` and ``real`` (scores or None) and ``relative``
        (synthetic / real for each score the baseline has).

    Raises:
        DatasetError: unlabelled or out-of-range labels, or fewer real training images than generated ones.
    """
    check_labels(test.labels, int(test.labels.max()) + 1 if len(test) else 0, f"{test.name} (real test split)")
    num_classes = int(test.labels.max()) + 1
    if len(images) != len(labels):
        raise DatasetError(f"{source}: {len(images)} images but {len(labels)} labels")
    synthetic = train_and_score(images, labels, test, num_classes=num_classes, source=source, seed=seed,
                                device=device)
    real = None
    if real_train is not None:
        if len(real_train) < len(images):
            raise DatasetError(f"{real_train.name}: the real baseline needs {len(images)} training images (as many as "
                               f"generated), it holds {len(real_train)}")
        draw = torch.randperm(len(real_train), generator=torch.Generator().manual_seed(seed))[: len(images)]
        chosen = real_train.subset(draw)
        real = train_and_score(chosen.images, chosen.labels, test, num_classes=num_classes,
                               source=f"{real_train.name} ({len(chosen)} drawn with seed {seed})", seed=seed,
                               device=device)
    relative = None if real is None else {
        k: (synthetic[k] / real[k] if synthetic[k] is not None and real[k] else None)
        for k in ("accuracy", "balanced_accuracy", "auc")}
    return {"kind": "tstr-utility", "version": 1, "recipe": asdict(RECIPE), "seed": seed,
            "num_classes": num_classes, "classes": list(test.classes),
            "test": {"source": test.name, "num_images": len(test),
                     "class_counts": torch.bincount(test.labels, minlength=num_classes).tolist()},
            "synthetic": synthetic, "real": real, "relative": relative}


def summary_line(report: dict[str, Any]) -> str:
    """One line: TSTR accuracy (balanced accuracy, AUC) beside the real baseline."""
    def scores(s: dict[str, Any]) -> str:
        auc = f", AUC {s['auc']:.3f}" if s["auc"] is not None else ""
        return f"accuracy {s['accuracy']:.4f} (balanced {s['balanced_accuracy']:.4f}{auc})"

    syn, real = report["synthetic"], report["real"]
    line = (f"TSTR on {report['test']['num_images']} real test images: trained on {syn['num_images']} generated "
            f"{scores(syn)}")
    if real is not None:
        line += f"; on {real['num_images']} real {scores(real)}"
    return line


def write_utility(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as JSON (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, path)
    return path


def label_index(names: list[str], classes: tuple[str, ...], where: Path) -> torch.Tensor:
    """(N,) int64 labels for class ``names``: integers as they are, else positions in the real data's ``classes``.

    Raises:
        DatasetError: a name that is neither an integer nor one of ``classes``, naming ``where``.
    """
    index = {name: i for i, name in enumerate(classes)}
    out = []
    for name in names:
        if name.lstrip("-").isdigit():
            out.append(int(name))
        elif name in index:
            out.append(index[name])
        else:
            known = f"one of {', '.join(classes)}" if classes else "an integer class id (the real data has no names)"
            raise DatasetError(f"{where}: label '{name}' is not {known}")
    return torch.tensor(out, dtype=torch.long)


def load_labelled_generated(path: str | Path, classes: tuple[str, ...] = ()) -> ImageDataset:
    """Labelled generated images: a ``.npz`` with ``images`` and ``labels`` arrays, or a folder of numbered PNGs
    (``medfed sample``'s layout) with a ``labels.csv`` (``file,label`` header; a label is a class id or one of the
    real data's ``classes``).

    Raises:
        DatasetError: unreadable images, no labels, or PNGs missing from ``labels.csv``, naming the path.
    """
    from medfed.datasets.labels import read_labels_csv
    from medfed.evaluation.report import load_generated

    path = Path(path).expanduser()
    data = load_generated(path)
    if path.is_dir():
        csv_path = path / "labels.csv"
        if not csv_path.is_file():
            raise DatasetError(f"{path}: no labels.csv (file,label) beside the generated PNGs; TSTR needs each "
                               "image's class")
        table = read_labels_csv(csv_path)
        files = sorted(p.name for p in path.glob("*.png") if p.stem.isdigit())
        missing = [f for f in files if f not in table]
        if missing:
            raise DatasetError(f"{csv_path}: no label for {len(missing)} generated images (first: {missing[0]})")
        data = ImageDataset(data.images, label_index([table[f] for f in files], classes, csv_path), data.name)
    return data


def sample_labelled(checkpoint: str | Path, num: int, *, guidance: float | None = None, sampler: str | None = None,
                    steps: int | None = None, seed: int = 0, device: str = "auto") -> tuple[ImageDataset, Any]:
    """Sample ``num`` images from a class-conditional checkpoint, every class equally often (0, 1, ..., K-1, 0, ...).

    Returns:
        The images with their labels, and the checkpoint (its ``config`` and ``image_shape``).

    Raises:
        DatasetError: the checkpoint is unconditional (``model.num-classes`` = 0).
    """
    from medfed.devices import resolve_device
    from medfed.diffusion import sample_images
    from medfed.diffusion.sampling import class_cycle
    from medfed.generate import load_model

    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    num_classes = ckpt.config.model.num_classes
    if num_classes == 0:
        raise DatasetError(f"{checkpoint}: an unconditional model (model.num-classes = 0) gives no class labels; "
                           "TSTR needs a class-conditional checkpoint or --generated with labels")
    labels = class_cycle(num, num_classes)
    images = sample_images(model, ckpt.config.diffusion, num, ckpt.image_shape, device=dev, seed=seed,
                           sampler=sampler, steps=steps, show_progress=True, class_labels=labels, guidance=guidance)
    return ImageDataset(images, labels, f"{Path(checkpoint).name} (sampled)"), ckpt


@dataclass(frozen=True)
class UtilityOptions:
    """What ``medfed evaluate utility`` measures.

    Attributes:
        generated: labelled generated images (:func:`load_labelled_generated`), or empty to sample ``checkpoint``.
        checkpoint: a class-conditional checkpoint to sample ``num`` images from, every class equally often.
        num, guidance, sampler, steps: sampling settings (default guidance, sampler, steps: the checkpoint's).
        real, real_format: the real labelled data with ``train`` and ``test`` splits (default: the checkpoint's
            dataset); ``test_split`` is scored, ``train`` gives the baseline.
        baseline: also train on as many real training images.
        seed, device, out: classifier and sampling seed, device, JSON path.
    """

    generated: str = ""
    checkpoint: str = ""
    num: int = 1000
    guidance: float | None = None
    sampler: str | None = None
    steps: int | None = None
    real: str = ""
    real_format: str = "npz"
    test_split: str = "test"
    baseline: bool = True
    seed: int = 0
    device: str = "auto"
    out: str = ""


def evaluate_utility(options: UtilityOptions) -> tuple[dict[str, Any], Path]:
    """Load or sample the labelled generated images, run :func:`utility_report` on the real data (at its own
    channels and size) and write the JSON. Returns the report and its path."""
    import dataclasses

    from medfed.checkpoint import load_checkpoint
    from medfed.config import DataConfig
    from medfed.datasets import load_dataset
    from medfed.devices import resolve_device
    from medfed.errors import ConfigError

    if bool(options.generated) == bool(options.checkpoint):
        raise ConfigError("--generated or --checkpoint: give exactly one source of generated images")
    if options.num < 1:
        raise ConfigError(f"--num {options.num}: must be >= 1")
    if options.real:
        data = DataConfig(dataset=options.real_format, path=options.real)
    elif options.checkpoint:
        data = load_checkpoint(options.checkpoint).config.data  # the dataset the model was trained on
    else:
        raise ConfigError("--real: the real labelled data (train and test splits) is needed with --generated")
    data = dataclasses.replace(data, limit=0)
    test = load_dataset(dataclasses.replace(data, split=options.test_split))
    if options.checkpoint:
        generated, _ = sample_labelled(options.checkpoint, options.num, guidance=options.guidance,
                                       sampler=options.sampler, steps=options.steps, seed=options.seed,
                                       device=options.device)
        source = f"{options.checkpoint} ({options.num} sampled, seed {options.seed})"
    else:
        generated, source = load_labelled_generated(options.generated, test.classes), options.generated
    real_train = load_dataset(dataclasses.replace(data, split="train")) if options.baseline else None
    report = utility_report(generated.images, generated.labels, test, real_train=real_train, source=source,
                            seed=options.seed, device=resolve_device(options.device))
    if options.checkpoint:
        report["sampling"] = {"checkpoint": options.checkpoint, "num": options.num, "guidance": options.guidance,
                              "sampler": options.sampler, "steps": options.steps, "seed": options.seed}
        ckpt = Path(options.checkpoint)
        default_out = ckpt.parent.parent / "evaluation" / f"utility-{ckpt.stem}-n{options.num}.json"
    else:
        gen = Path(options.generated)
        default_out = gen / "utility.json" if gen.is_dir() else gen.with_name(f"{gen.stem}-utility.json")
    return report, write_utility(report, options.out or default_out)
