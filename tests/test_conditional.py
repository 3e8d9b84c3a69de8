"""Class-conditional diffusion: label embedding gradients under DP-SGD, guidance, the null class, end to end."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.io import read_image

from medfed.centralized import train_centralized
from medfed.config import DataConfig, DiffusionConfig, from_flat
from medfed.datasets import ImageDataset, load_dataset
from medfed.diffusion import (
    condition_labels,
    denoising_error,
    draw_noisy_inputs,
    make_scheduler,
    per_sample_loss,
    sample_images,
)
from medfed.diffusion.sampling import guided
from medfed.errors import ConfigError
from medfed.generate import generate_from_checkpoint, load_model
from medfed.models import build_unet, count_parameters
from medfed.privacy.accounting import plan_noise
from medfed.privacy.dp_sgd import per_sample_grads, train_private
from medfed.privacy.layer_grads import per_layer_grads

CPU = torch.device("cpu")
CLASSES = 3


def conditional_unet(seed=0, classes=CLASSES):
    torch.manual_seed(seed)
    model = build_unet("pico", 1, classes)
    with torch.no_grad():  # MONAI zero-initialises some convolutions; give every parameter a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def noisy_batch(images=4, draws=2):
    x0 = load_dataset(DataConfig(dataset="embedded-mnist", limit=images)).images
    return draw_noisy_inputs(make_scheduler(DiffusionConfig()), x0, draws, torch.Generator().manual_seed(1))


def opacus_hooks_grads(model, x_t, t, eps, y):
    """Opacus' own per-sample gradients (``hooks``) of the mean over K draws, as ``train_private`` takes them."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(model)
    losses = torch.stack([denoising_error(gsm(x_t[:, k], t[:, k], class_labels=y[:, k]), eps[:, k])
                          for k in range(x_t.shape[1])], 1).mean(1)
    losses.mean().backward()  # loss_reduction "mean": Opacus undoes the mean, so grad_sample is each image's own
    grads = {n: p.grad_sample for n, p in model.named_parameters()}
    gsm.cleanup()
    return grads, losses.detach()


@pytest.mark.parametrize("engine", ["layers", "vmap", "hooks"])
def test_label_embedding_per_sample_grads_match_a_per_image_loop(engine):
    model = conditional_unet()
    x_t, t, eps = noisy_batch(images=4, draws=2)
    y = torch.tensor([0, 2, CLASSES, 2])[:, None].expand_as(t)  # two images share a class; one is the null class
    if engine == "hooks":
        grads, losses = opacus_hooks_grads(model, x_t, t, eps, y)
    else:
        grads, losses = (per_layer_grads(model, x_t, t, eps, y) if engine == "layers"
                         else per_sample_grads(model, x_t, t, eps, chunk_size=3, labels=y))
    for i in range(len(x_t)):
        model.zero_grad()
        loss = denoising_error(model(x_t[i], t[i], class_labels=y[i]), eps[i]).mean()
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, atol=1e-6, rtol=1e-4, msg=f"{name}, image {i}")
    emb = grads["class_embedding.weight"]  # (B, classes + 1, dim)
    assert emb.shape == (4, CLASSES + 1, model.class_embedding.embedding_dim)
    rows_used = emb.abs().sum(2) > 0
    assert rows_used.tolist() == [[r == label for r in range(CLASSES + 1)] for label in (0, 2, CLASSES, 2)]


@pytest.mark.parametrize("engine", ["layers", "vmap", "hooks"])
def test_dp_sgd_trains_a_conditional_model_at_a_site_holding_some_classes(engine):
    data = load_dataset(DataConfig(dataset="embedded-mnist", limit=40))
    keep = torch.isin(data.labels, torch.tensor([0, 1]))  # this site holds classes 0 and 1 of 10
    site = ImageDataset(data.images[keep], data.labels[keep], "classes 0 and 1")
    model = build_unet("pico", 1, 10)
    before = model.class_embedding.weight.detach().clone()
    plan = plan_noise(len(site), 4, 1, 1, target_epsilon=50.0, delta=1e-3, accountant="rdp")
    done = train_private(model, site, plan, batch_size=4, lr=1e-2, local_epochs=1, max_grad_norm=1.0,
                         noise_multiplicity=2, engine=engine, scheduler=make_scheduler(DiffusionConfig()),
                         device=CPU, num_classes=10, label_dropout=0.5)
    assert done.steps == plan.steps_per_round and all(np.isfinite(done.losses))
    assert not torch.equal(model.class_embedding.weight, before)  # the embedding is trained (and noised)
    with pytest.raises(ConfigError, match="model.num-classes"):  # a label the model has no embedding for
        train_private(build_unet("pico", 1, 1), site, plan, batch_size=4, lr=1e-2, local_epochs=1,
                      max_grad_norm=1.0, noise_multiplicity=1, engine=engine,
                      scheduler=make_scheduler(DiffusionConfig()), device=CPU, num_classes=1)


def test_neutral_guidance_is_the_conditional_model_and_a_dropped_label_is_the_null_class():
    model = conditional_unet(seed=1).eval()
    x = torch.randn(4, 1, 28, 28)
    t = torch.tensor([5, 300, 600, 999])
    labels = torch.tensor([0, 1, 2, 1])

    def predict(x, t, y):
        return model(x, t, class_labels=y)

    with torch.no_grad():
        conditional = model(x, t, class_labels=labels)
        null = model(x, t, class_labels=torch.full_like(labels, CLASSES))
        torch.testing.assert_close(guided(predict, labels, CLASSES, 0.0)(x, t), conditional)
        w = 1.5  # and w > 0 is (1 + w) eps_c - w eps_u, from one doubled batch
        torch.testing.assert_close(guided(predict, labels, CLASSES, w)(x, t), (1 + w) * conditional - w * null,
                                   atol=1e-5, rtol=1e-4)
        assert not torch.allclose(conditional, null)  # the labels matter
        # label dropout 1 - 1e-9: every label is dropped; it gives the null class's output, as do unknown labels
        dropped = condition_labels(labels, CLASSES, 1 - 1e-9, torch.Generator().manual_seed(0))
        assert dropped.tolist() == [CLASSES] * 4
        torch.testing.assert_close(model(x, t, class_labels=dropped), null)
        unknown = condition_labels(torch.tensor([-1, 2]), CLASSES, 0.0, None)
        assert unknown.tolist() == [CLASSES, 2]
    assert condition_labels(labels, 0, 0.5, None) is None  # unconditional models take no labels
    kept = condition_labels(torch.zeros(10_000, dtype=torch.long), CLASSES, 0.1, torch.Generator().manual_seed(0))
    assert 0.08 < (kept == CLASSES).float().mean().item() < 0.12


def test_sampling_a_conditional_model_with_and_without_guidance():
    model = conditional_unet(seed=2)
    cfg = DiffusionConfig(timesteps=20, sample_steps=4)
    labels = torch.tensor([2, 0, 1])
    run = lambda **kw: sample_images(model, cfg, 3, (1, 28, 28), device=CPU, seed=3, precision="float32",  # noqa: E731
                                     **kw)
    plain = run(class_labels=labels)
    assert plain.shape == (3, 1, 28, 28)
    torch.testing.assert_close(run(class_labels=labels, guidance=0.0), plain)
    assert not torch.allclose(run(class_labels=labels, guidance=2.0), plain)
    assert not torch.allclose(run(class_labels=torch.tensor([0, 0, 0])), plain)
    # DDPM too, in batches of 2 (the last partial batch takes its own labels)
    ddpm = sample_images(model, cfg, 3, (1, 28, 28), device=CPU, sampler="ddpm", class_labels=labels,
                         guidance=1.0, batch_size=2, precision="float32")
    assert ddpm.shape == (3, 1, 28, 28) and torch.isfinite(ddpm).all()
    with pytest.raises(ConfigError, match="class labels must be in"):
        run(class_labels=torch.tensor([0, 1, CLASSES]))
    with pytest.raises(ConfigError, match="unconditional"):
        sample_images(build_unet("pico", 1), cfg, 1, (1, 28, 28), device=CPU, class_labels=[0])


def test_conditional_parameter_count_and_per_sample_loss():
    plain, conditional = build_unet("pico", 1), build_unet("pico", 1, 10)
    dim = conditional.class_embedding.embedding_dim
    assert count_parameters(conditional) == count_parameters(plain) + 11 * dim
    x0 = torch.rand(3, 1, 28, 28) * 2 - 1
    loss = per_sample_loss(conditional, make_scheduler(DiffusionConfig()), x0, torch.Generator().manual_seed(0),
                           torch.tensor([0, 9, 10]))
    assert loss.shape == (3,)


def medfed(*args):
    return subprocess.run([sys.executable, "-m", "medfed.cli", *args], capture_output=True, text=True)


@pytest.mark.slow  # trains, saves and samples through the CLI (about 8 s): the full suite runs it
def test_conditional_centralized_run_trains_saves_loads_and_samples_a_class(tmp_path):
    cfg = from_flat({"model.preset": "pico", "model.num-classes": 10, "train.steps": 6, "train.batch-size": 8,
                     "train.lr": 1e-3, "train.log-every": 3, "train.checkpoint-every": 1000,
                     "train.sample-every": 1000, "train.num-samples": 10, "diffusion.sample-steps": 3,
                     "diffusion.guidance": 1.0, "data.limit": 64, "train.device": "cpu",
                     "output.dir": str(tmp_path), "output.name": "cond"})
    result = train_centralized(cfg, show_progress=False)
    assert np.isfinite(result.last_loss)
    assert read_image(str(result.grid)).shape[1:] == (2 + 10 * 30, 2 + 30)  # one row per class, 1 image each
    model, ckpt = load_model(result.run.latest_checkpoint, CPU)
    assert ckpt.config.model.num_classes == 10 and model.class_embedding.num_embeddings == 11
    out = tmp_path / "class3"
    proc = medfed("sample", "--checkpoint", str(result.run.latest_checkpoint), "--num", "4", "--class", "3",
                  "--guidance", "2", "--steps", "3", "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png", "00003.png",
                                                         "grid.png"]
    # no class: every class, one row each (3 per class for 25 asked)
    every = generate_from_checkpoint(result.run.latest_checkpoint, 25, out=tmp_path / "every", steps=2,
                                     device="cpu")
    assert len(list(every.glob("0*.png"))) == 30
    grid = read_image(str(every / "grid.png"))
    assert grid.shape[1] == 2 + 10 * (28 + 2) and grid.shape[2] == 2 + 3 * (28 + 2)  # 10 rows of 3


def test_class_names_resolve_through_the_runs_classes(tmp_path):
    from medfed.checkpoint import Checkpoint, save_checkpoint
    from medfed.generate import resolve_class

    cfg = from_flat({"model.num-classes": 2, "data.classes": "normal,pneumonia"})
    ckpt = Checkpoint(model={}, config=cfg, image_shape=(1, 28, 28), step=0)
    assert resolve_class("pneumonia", ckpt, "x.pt") == 1 and resolve_class("0", ckpt, "x.pt") == 0
    with pytest.raises(ConfigError, match="names normal, pneumonia or IDs 0 to 1"):
        resolve_class("2", ckpt, "x.pt")
    unconditional = Checkpoint(model={}, config=from_flat({}), image_shape=(1, 28, 28), step=0)
    with pytest.raises(ConfigError, match="unconditional"):
        resolve_class("0", unconditional, save_checkpoint(unconditional, tmp_path / "u.pt"))


def test_config_keys_are_checked():
    for key, value in [("model.num-classes", -1), ("train.label-dropout", 1.0), ("diffusion.guidance", -0.5),
                       ("train.precision", "float16")]:
        with pytest.raises(ConfigError, match=key):
            from_flat({key: value})


def test_a_sites_non_private_round_trains_its_own_classes():
    from medfed.federation.site import train_epochs

    data = load_dataset(DataConfig(dataset="embedded-mnist", limit=40))
    keep = data.labels == 7  # a site holding one class only
    site = ImageDataset(data.images[keep], data.labels[keep], "class 7")
    cfg = from_flat({"model.preset": "pico", "model.num-classes": 10, "train.batch-size": 2, "train.lr": 1e-3,
                     "train.label-dropout": 0.0, "federation.local-epochs": 1})
    model = conditional_unet(classes=10)
    before = model.class_embedding.weight.detach().clone()
    losses = train_epochs(model, site, cfg, seed=0, device=CPU)
    assert len(losses) == int(keep.sum()) // 2 + int(keep.sum()) % 2 and np.isfinite(losses).all()
    moved = (model.class_embedding.weight - before).abs().sum(1)
    others = torch.cat([moved[:7], moved[8:]])  # AdamW's weight decay shrinks them a little, no gradient moves them
    assert moved[7] > 20 * others.max()
