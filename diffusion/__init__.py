"""EDM diffusion: preconditioning, loss, Heun sampler with guidance, training loop."""
from .edm import EDMConfig, EDMDenoiser, edm_loss, loss_weight, precond_coefficients, sample_sigma
from .sampler import SamplerConfig, heun_sample, sigma_steps

__all__ = ["EDMConfig", "EDMDenoiser", "edm_loss", "loss_weight", "precond_coefficients", "sample_sigma",
           "SamplerConfig", "heun_sample", "sigma_steps"]
