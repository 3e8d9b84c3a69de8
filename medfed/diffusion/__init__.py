"""DDPM noising, the noise or velocity regression loss, the training step and the DDPM/DDIM samplers (MONAI)."""

from medfed.diffusion.ddpm import (
    check_labels,
    condition_labels,
    denoising_error,
    draw_noisy_inputs,
    make_scheduler,
    per_sample_loss,
    predict_noise,
)
from medfed.diffusion.sampling import sample_images
from medfed.diffusion.training import StepOptions, train_step

__all__ = ["StepOptions", "check_labels", "condition_labels", "denoising_error", "draw_noisy_inputs",
           "make_scheduler", "per_sample_loss", "predict_noise", "sample_images", "train_step"]
