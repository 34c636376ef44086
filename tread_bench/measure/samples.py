"""Sample grids: the same noise and labels for every run and every evaluation, saved as PNG, and
side-by-side figures of several runs' grids (people judge generative models by looking at them)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def grid_labels(num_classes: int, per_class: int, max_classes: int = 10) -> torch.Tensor:
    """Labels laid out so that each column of the grid is one class (rows = repeats)."""
    classes = min(num_classes, max_classes)
    return torch.arange(classes).repeat(per_class)


def sample_grid(denoiser, data_shape, num_classes: int, sampler, per_class: int, seed: int, device,
                decode=None, objective=None) -> tuple[torch.Tensor, int]:
    """(images in [-1, 1], columns): ``per_class`` rows of up to 10 classes, fixed noise from ``seed``;
    sampled by ``objective`` (default EDM)."""
    from .evaluate import generate_with_labels

    labels = grid_labels(num_classes, per_class)
    images = generate_with_labels(denoiser, labels, data_shape, num_classes, sampler, seed, len(labels), device,
                                  objective=objective)
    if decode is not None:
        images = decode(images)
    return images, min(num_classes, 10)


def save_grid(images: torch.Tensor, columns: int, path: str | Path) -> Path:
    """Write the grid atomically (a kill never leaves half a PNG)."""
    from torchvision.utils import save_image

    from tread_bench.core.io import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: save_image((images + 1) / 2, tmp, nrow=columns, padding=1, pad_value=1.0,
                                              format="png"))
    return path


def side_by_side(paths: Sequence[str | Path], titles: Sequence[str], out: str | Path, suptitle: str = "") -> Path:
    """One figure with the given grid PNGs one above the other (grids are wide: a column per class),
    each under its title, so the same noise and label can be compared down a column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    images = [Image.open(p) for p in paths]
    width = 10.0
    heights = [width * im.height / im.width + 0.4 for im in images]
    fig, axes = plt.subplots(len(paths), 1, figsize=(width, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, im, title in zip(axes[:, 0], images, titles):
        ax.imshow(im, cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
