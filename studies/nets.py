"""The small networks and data that several studies train: one definition each.

The studies' results depend on the order in which the layers are created (each ``nn.Linear`` and
``nn.Conv2d`` draws its initial weights from the global RNG) and on what each draw consumes, so
these builders create the same layers in the same order as the copies they replace did.
``examples/`` keeps its own copies: an example is a script a user reads on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import nn

Norm = Callable[[int], nn.Module]


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (bundled, no download): images ``(1797, 1, 8, 8)`` in [0, 1].

    Returns:
        The float32 images (pixel values 0..16 divided by 16, exact in float32) and the int64
        labels, in the dataset's order.
    """
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(labels, dtype=torch.long)


def smooth_prototypes(generator: torch.Generator, classes: int = 8) -> torch.Tensor:
    """``classes`` random smooth 12x12 one-channel images: 5x5 means of Gaussian 16x16 noise.

    A generated image task (not digits): a sample is a prototype under heavy noise.
    """
    return nn.functional.avg_pool2d(torch.randn(classes, 1, 16, 16, generator=generator), 5, 1)


def bn_convnet_features(
    in_channels: int, width: int, *, last_kernel: int = 3, pool_first: bool = False
) -> list[nn.Module]:
    """conv-BN-ReLU x3 to ``2 * width`` features: the convs without bias (BatchNorm follows).

    Each conv's output channels are scale-invariant on their own. Layout: conv 3x3 to ``width``
    (then a 2x2 max-pool if ``pool_first``), conv 3x3 to ``2 * width``, 2x2 max-pool, conv
    ``last_kernel`` x ``last_kernel`` (same padding), global average pool, flatten.

    Args:
        in_channels: channels of the input images.
        width: channels of the first conv; the others have twice as many.
        last_kernel: the third conv's kernel size (odd; 1 gives a 1x1 conv).
        pool_first: a max-pool after the first block too (for images larger than 16x16).

    Returns:
        The layers, in creation order, for an ``nn.Sequential``.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    if pool_first:
        layers.append(nn.MaxPool2d(2))
    return [
        *layers,
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, last_kernel, padding=last_kernel // 2, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ]


def bn_convnet(
    in_channels: int, width: int, classes: int, *, last_kernel: int = 3
) -> nn.Sequential:
    """:func:`bn_convnet_features` and a linear classifier, in one ``nn.Sequential``.

    >>> net = bn_convnet(1, 4, 10)
    >>> [name for name, p in net.named_parameters() if p.dim() == 4]
    ['0.weight', '3.weight', '7.weight']
    >>> net(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    features = bn_convnet_features(in_channels, width, last_kernel=last_kernel)
    return nn.Sequential(*features, nn.Linear(2 * width, classes))


def normed_mlp(
    sizes: Sequence[int],
    outputs: int,
    norm: Norm | Sequence[Norm] = nn.BatchNorm1d,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Linear (no bias) - normalization - activation per hidden layer, then a linear readout.

    Each hidden matrix is scale-invariant (per row under BatchNorm, as a whole under
    LayerNorm/RMSNorm).

    Args:
        sizes: the input size, then each hidden layer's width.
        outputs: the readout's outputs (it has a bias).
        norm: the normalization after each hidden layer, or one per hidden layer.
        activation: the nonlinearity after each normalization.

    >>> net = normed_mlp([4, 8, 8], 2, norm=[nn.LayerNorm, nn.RMSNorm], activation=nn.GELU)
    >>> [type(layer).__name__ for layer in net]
    ['Linear', 'LayerNorm', 'GELU', 'Linear', 'RMSNorm', 'GELU', 'Linear']
    >>> net(torch.zeros(3, 4)).shape
    torch.Size([3, 2])
    """
    hidden = list(pairwise(sizes))
    norms = [norm] * len(hidden) if callable(norm) else list(norm)
    if len(norms) != len(hidden):
        raise ValueError(f"norm: {len(norms)} normalizations for {len(hidden)} hidden layers")
    layers: list[nn.Module] = []
    for (inputs, width), make_norm in zip(hidden, norms, strict=True):
        layers += [nn.Linear(inputs, width, bias=False), make_norm(width), activation()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], outputs))
