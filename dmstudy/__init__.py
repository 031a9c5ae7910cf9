"""A reproducible study of memorization versus generalization in diffusion models trained on CIFAR-10 subsets

Modules:

- `dmstudy.analysis`: From run directories to findings: one tidy table of every metric, then τ_mem, the memorization onset and rate, best fidelity, double descent, normalized steps and scaling fits.
- `dmstudy.before`: What a model learns before it memorizes, from a sweep's results: whether paired models agree most before τ_mem, when the network starts to approach the memorizing denoiser, which noise levels overfit first, and when Halder's criterion changes side; each a verdict with a 95% interval.
- `dmstudy.claims`: What each study page shows and how it judges the paper's claims: the results a page reads, the derived quantities it tabulates, and the rules that turn them into verdicts.
- `dmstudy.diffusion`: DDPM and rectified flow on one interface: the forward process, the training loss, the samplers, and the closed-form minimiser of the empirical loss.
- `dmstudy.metrics`: Memorization (nearest-neighbour ratio, copy score), fidelity (sliced Wasserstein, FID, KID), novelty and the loss by noise level: exact, offline, and fast enough to run at every evaluation.
- `dmstudy.probes`: What a model has learned before τ_mem: its distance to the memorizing solution by noise level, Halder's relative distance of its samples, and the agreement of paired models' samples, measured at every evaluation.
- `dmstudy.site`: Render the study's website: the notebooks processed as `nbdev-docs` processes them, the study pages executed, then Quarto when it is installed, or nbconvert with a small template when it is not; and `dmstudy demo`.
- `dmstudy.theory`: A linear, one-step diffusion model on Gaussian data, Halder's relative distance in closed form, the transition from memorization to generalization as the training set grows, and the same distance for trained models."""

__version__ = "0.0.1"

from . import compat  # the torchvision guard, applied once for every module (see nbs/00a_compat.ipynb)
