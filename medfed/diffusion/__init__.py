"""DDPM noising, the epsilon-prediction loss and the DDPM/DDIM samplers, on MONAI schedulers."""

from medfed.diffusion.ddpm import make_scheduler, per_sample_loss
from medfed.diffusion.sampling import sample_images

__all__ = ["make_scheduler", "per_sample_loss", "sample_images"]
