"""The model as named blocks (torch / MONAI glue).

A site builds ``encoder.<modality>`` for each modality it holds, one ``fusion`` block, and
``head.<task>`` for each of its tasks, all from the federation's
:class:`~blossom_secure.config.ModelLayout`, so a block has the same parameters wherever
it is built and can be aggregated over the sites that hold it.

* ``encoder.image``: a MONAI network (2D or 3D by the layout): the small residual CNN
  ``monai.networks.nets.Regressor`` (``cnn``) or ``DenseNet121`` (``densenet121``), with
  group or instance norm (never batch norm) and non-in-place activations, as Opacus needs.
* ``encoder.tabular``: MONAI ``FullyConnectedNet`` (an MLP) over the layout's clinical
  features, standardised per site. Each of the layout's extra tabular modalities
  (``[model.extra_tabular.<name>]``) gets the same kind of encoder, ``encoder.<name>``.
* ``fusion``: the masked mean of the embeddings of the modalities a patient *has*, then a
  small MLP. A patient missing a modality contributes through the others; a modality
  missing for every patient in a batch gives that encoder exact zero gradients.
* ``head.<task>``: a linear classifier. Heads never leave the site.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from blossom_secure.blocks import FUSION, encoder_block, head_block
from blossom_secure.config import ImageConfig, ModelLayout, TabularConfig

__all__ = ["BlockModel", "Fusion", "build_image_encoder", "build_tabular_encoder"]

_ACT = ("relu", {"inplace": False})


def _norm(cfg: ImageConfig) -> tuple:
    if cfg.norm == "group":
        return ("group", {"num_groups": 4})
    return ("instance", {"affine": True})


def build_image_encoder(cfg: ImageConfig, embedding_dim: int) -> nn.Module:
    """The MONAI imaging encoder for ``cfg``, ending in an ``embedding_dim`` vector."""
    from monai.networks.nets import DenseNet121, Regressor

    if cfg.architecture == "densenet121":
        return DenseNet121(spatial_dims=cfg.spatial_dims, in_channels=1, out_channels=embedding_dim,
                           norm=_norm(cfg) if cfg.norm == "instance" else ("group", {"num_groups": 8}),
                           act=_ACT)
    return Regressor(in_shape=(1, *cfg.size), out_shape=(embedding_dim,), channels=cfg.channels,
                     strides=(2,) * len(cfg.channels), norm=_norm(cfg), act=_ACT)


def build_tabular_encoder(cfg: TabularConfig, embedding_dim: int) -> nn.Module:
    """The MONAI MLP over the federation's clinical features."""
    from monai.networks.nets import FullyConnectedNet

    return FullyConnectedNet(in_channels=len(cfg.features), out_channels=embedding_dim,
                             hidden_channels=cfg.hidden, act=_ACT)


class Fusion(nn.Module):
    """Masked mean over present modalities, then Linear-ReLU-Linear (residual)."""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(nn.Linear(embedding_dim, embedding_dim), nn.ReLU(inplace=False),
                                 nn.Linear(embedding_dim, embedding_dim))

    def forward(self, embeddings: list[torch.Tensor], present: list[torch.Tensor]) -> torch.Tensor:
        """Fuse.

        Args:
            embeddings: One ``(N, E)`` tensor per modality the site has.
            present: One ``(N,)`` bool/float tensor per modality: whether the patient has it.

        Returns:
            ``(N, E)`` fused representation.
        """
        weights = torch.stack([p.to(embeddings[0].dtype) for p in present], dim=1)  # (N, M)
        stacked = torch.stack(embeddings, dim=1)  # (N, M, E)
        count = weights.sum(dim=1, keepdim=True).clamp(min=1.0)
        mean = (stacked * weights.unsqueeze(-1)).sum(dim=1) / count
        return mean + self.mix(mean)


class BlockModel(nn.Module):
    """A site's model: the blocks for its modalities and tasks.

    Args:
        layout: The federation's block layout.
        modalities: The modalities this site holds.
        tasks: The tasks this site trains.
    """

    def __init__(self, layout: ModelLayout, modalities: tuple[str, ...], tasks: tuple[str, ...]) -> None:
        super().__init__()
        unknown = [t for t in tasks if t not in layout.tasks]
        if unknown:
            raise ValueError(f"tasks not in the federation layout: {unknown}")
        if not modalities:
            raise ValueError("a site needs at least one modality")
        strange = [m for m in modalities if m not in layout.modalities]
        if strange:
            raise ValueError(f"modalities not in the federation layout: {strange}")
        self.layout = layout
        self.modalities = tuple(m for m in layout.modalities if m in modalities)
        self.tasks = tuple(sorted(tasks))
        e = layout.embedding_dim
        self.encoders = nn.ModuleDict()
        for m in self.modalities:
            if m == "image":
                self.encoders[m] = build_image_encoder(layout.image, e)
            else:
                self.encoders[m] = build_tabular_encoder(layout.tabular_config(m), e)
        self.fusion = Fusion(e)
        self.heads = nn.ModuleDict({t: nn.Linear(e, layout.tasks[t]) for t in self.tasks})

    def blocks(self) -> dict[str, nn.Module]:
        """Block name -> module, in canonical order (encoders, fusion, heads)."""
        out: dict[str, nn.Module] = {encoder_block(m): self.encoders[m] for m in self.modalities}
        out[FUSION] = self.fusion
        out.update({head_block(t): self.heads[t] for t in self.tasks})
        return out

    def forward(self, image: torch.Tensor | None, image_present: torch.Tensor | None,
                tabular: torch.Tensor | None, tabular_present: torch.Tensor | None,
                extra: Mapping[str, torch.Tensor] | None = None,
                extra_present: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Logits per task. Inputs of modalities the site lacks are ``None``; ``extra`` and
        ``extra_present`` hold the inputs of the layout's extra tabular modalities."""
        inputs = {"image": (image, image_present), "tabular": (tabular, tabular_present)}
        for m in self.modalities:
            if m not in inputs:
                inputs[m] = ((extra or {}).get(m), (extra_present or {}).get(m))
        embeddings, present = [], []
        for m in self.modalities:
            x, p = inputs[m]
            if x is None or p is None:
                raise ValueError(f"no input for modality {m!r}")
            embeddings.append(self.encoders[m](x))
            present.append(p)
        fused = self.fusion(embeddings, present)
        return {t: self.heads[t](fused) for t in self.tasks}

    # -- blocks as flat vectors -------------------------------------------------------------

    def block_sizes(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.blocks().items()}

    def get_block(self, name: str) -> np.ndarray:
        """The block's parameters as one float32 vector (a copy)."""
        params = list(self.blocks()[name].parameters())
        return torch.nn.utils.parameters_to_vector([p.detach() for p in params]).cpu().numpy().astype(np.float32)

    def set_block(self, name: str, vector: np.ndarray) -> None:
        """Load a float32 vector into the block's parameters.

        Raises:
            ValueError: the vector's size does not match the block.
        """
        module = self.blocks()[name]
        size = sum(p.numel() for p in module.parameters())
        vector = np.asarray(vector)
        if vector.ndim != 1 or vector.size != size:
            raise ValueError(f"{name}: expected a vector of {size} values, got shape {vector.shape}")
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.from_numpy(vector.astype(np.float32)), list(module.parameters()))

    def get_blocks(self) -> dict[str, np.ndarray]:
        return {name: self.get_block(name) for name in self.blocks()}

    def set_blocks(self, vectors: Mapping[str, np.ndarray]) -> None:
        sizes = self.block_sizes()
        for name, vector in vectors.items():
            if name not in sizes:
                raise ValueError(f"this model has no block {name!r}")
            if np.asarray(vector).size != sizes[name]:
                raise ValueError(f"{name}: expected {sizes[name]} values, got {np.asarray(vector).size}")
        for name, vector in vectors.items():
            self.set_block(name, vector)
