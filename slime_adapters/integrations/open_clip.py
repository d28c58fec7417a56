"""open_clip vision encoders for the SliME adapter (the ``open-clip`` extra).

:class:`OpenCLIPVisionEncoder` wraps an open_clip ``VisionTransformer`` built from its config
(random weights; load real ones with ``load_state_dict`` or :meth:`OpenCLIPVisionEncoder.load`)
and returns one hidden state per view, as ``(v, s, d)`` tokens for
:class:`slime_adapters.SliMEVisualAdapter`. Layers count as transformers' ``hidden_states`` do:
0 is the embeddings after ``ln_pre``, ``k`` the output of block ``k``, −1 the last block, −2 the
one before (LLaVA's and SliME's choice). The CLS token is dropped when ``drop_cls``.

open_clip needs torchvision; the library imports it only when an encoder is built.

Shapes: ``v`` views, ``T`` image side, ``s`` tokens per view, ``d`` the encoder width.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import Tensor, nn

from slime_adapters.config import atomic_write_bytes

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "OpenCLIPVisionEncoder"]

CONFIG_FILE = "open_clip_encoder.json"
WEIGHTS_FILE = "open_clip_encoder.safetensors"
_VISION_KEYS = ("image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio",
                "ls_init_value")


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:
        raise ImportError("OpenCLIPVisionEncoder needs open_clip (pip install "
                          "'slime-adapters[open-clip]', with a torchvision that imports beside "
                          f"your torch): {exc}") from exc
    return open_clip


class OpenCLIPVisionEncoder(nn.Module):
    """An open_clip ViT as SliME's vision encoder.

    Args:
        vision_cfg: open_clip's ``vision_cfg`` keys ``image_size``, ``patch_size``, ``width``,
            ``layers`` and optionally ``head_width`` (64), ``mlp_ratio`` (4.0),
            ``ls_init_value``.
        embed_dim: the CLIP embedding width (the ViT's output projection; unused by SliME).
        quick_gelu: the OpenAI models' QuickGELU activation.
        feature_layer: the hidden state that feeds the adapter (see the module docstring).
        drop_cls: drop the CLS token of each view.

    Raises:
        ValueError: an unknown or missing ``vision_cfg`` key, a width the heads do not divide, a
            feature layer the ViT does not have.
        ImportError: open_clip is not installed.
    """

    def __init__(self, vision_cfg: Mapping[str, Any], *, embed_dim: int = 512,
                 quick_gelu: bool = False, feature_layer: int = -2,
                 drop_cls: bool = True) -> None:
        super().__init__()
        cfg = dict(vision_cfg)
        unknown = sorted(set(cfg) - set(_VISION_KEYS))
        if unknown:
            raise ValueError(f"OpenCLIPVisionEncoder: unknown vision_cfg key(s) {unknown}; "
                             f"supported: {list(_VISION_KEYS)}")
        missing = sorted(k for k in _VISION_KEYS[:4] if k not in cfg)
        if missing:
            raise ValueError(f"OpenCLIPVisionEncoder: vision_cfg lacks {missing}")
        cfg.setdefault("head_width", 64)
        cfg.setdefault("mlp_ratio", 4.0)
        if cfg["width"] % cfg["head_width"]:
            raise ValueError(f"OpenCLIPVisionEncoder: width {cfg['width']} is not a multiple of "
                             f"head_width {cfg['head_width']}")
        layers = int(cfg["layers"])
        if isinstance(feature_layer, bool) or not isinstance(feature_layer, int) or not (
                -(layers + 1) <= feature_layer <= layers):
            raise ValueError(f"OpenCLIPVisionEncoder: feature_layer {feature_layer!r} does not "
                             f"exist; the ViT has {layers} blocks (layers "
                             f"{-(layers + 1)}..{layers})")
        open_clip = _open_clip()
        from open_clip.transformer import QuickGELU, VisionTransformer

        self.settings = {"vision_cfg": cfg, "embed_dim": int(embed_dim),
                         "quick_gelu": bool(quick_gelu), "feature_layer": feature_layer,
                         "drop_cls": bool(drop_cls)}
        self.visual = VisionTransformer(
            image_size=cfg["image_size"], patch_size=cfg["patch_size"], width=cfg["width"],
            layers=layers, heads=cfg["width"] // cfg["head_width"], mlp_ratio=cfg["mlp_ratio"],
            ls_init_value=cfg.get("ls_init_value"), output_dim=int(embed_dim),
            act_layer=QuickGELU if quick_gelu else nn.GELU)
        self.open_clip_version = getattr(open_clip, "__version__", "unknown")
        # hidden state k is the output of k blocks
        self.blocks_used = feature_layer % (layers + 1)

    @classmethod
    def from_model_name(cls, name: str, **changes: Any) -> OpenCLIPVisionEncoder:
        """The ViT of an open_clip model config (``"ViT-B-16"``, ...), random weights;
        ``changes`` override ``vision_cfg`` keys or the keywords of the constructor.

        Raises:
            ValueError: open_clip has no such config, or it is not a ViT.
        """
        cfg = _open_clip().get_model_config(name)
        if cfg is None:
            raise ValueError(f"open_clip has no model config {name!r}")
        vision = {k: v for k, v in cfg["vision_cfg"].items() if k in _VISION_KEYS}
        other = set(cfg["vision_cfg"]) - set(_VISION_KEYS)
        if "timm_model_name" in other and cfg["vision_cfg"]["timm_model_name"]:
            raise ValueError(f"open_clip config {name!r} is a timm tower, not a ViT")
        kwargs = {k: changes.pop(k) for k in ("feature_layer", "drop_cls") if k in changes}
        vision.update(changes)
        return cls(vision, embed_dim=cfg["embed_dim"], quick_gelu=cfg.get("quick_gelu", False),
                   **kwargs)

    # ---------------------------------------------------------------------------- properties
    @property
    def hidden_size(self) -> int:
        return int(self.settings["vision_cfg"]["width"])

    @property
    def image_size(self) -> int:
        return int(self.settings["vision_cfg"]["image_size"])

    @property
    def tokens_per_view(self) -> int:
        side = self.image_size // int(self.settings["vision_cfg"]["patch_size"])
        return side * side + int(not self.settings["drop_cls"])

    # ------------------------------------------------------------------------------- forward
    def forward(self, pixels: Tensor) -> Tensor:
        """``(v, 3, T, T)`` normalised views → ``(v, s, d)`` hidden state ``feature_layer``.

        Raises:
            ValueError: views of another size than the ViT's ``image_size``.
        """
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"OpenCLIPVisionEncoder: pixels must be (v, 3, {self.image_size}, "
                             f"{self.image_size}), got {tuple(pixels.shape)}")
        vis = self.visual
        x = vis.conv1(pixels.to(vis.conv1.weight.dtype))  # (v, d, g, g)
        x = x.flatten(2).transpose(1, 2)
        cls = vis.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + vis.positional_embedding.to(x.dtype)
        x = vis.ln_pre(vis.patch_dropout(x))
        for block in vis.transformer.resblocks[: self.blocks_used]:  # over layers, not samples
            x = block(x)
        return x[:, 1:] if self.settings["drop_cls"] else x

    # ------------------------------------------------------------------------------ save/load
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """``folder/open_clip_encoder.json`` (the settings) and ``.safetensors`` (the weights),
        each written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.visual.state_dict().items()}
        atomic_write_bytes(folder / WEIGHTS_FILE, st_save(state, metadata={"format": "pt"}))
        atomic_write_bytes(folder / CONFIG_FILE, json.dumps(
            {**self.settings, "open_clip_version": self.open_clip_version}, indent=2).encode())
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> OpenCLIPVisionEncoder:
        """The encoder :meth:`save` wrote.

        Raises:
            FileNotFoundError: a file is missing. ValueError: the settings do not parse, or the
            weights do not fit (missing, unexpected or mis-shaped keys).
        """
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{str(folder / name)!r} does not exist")
        try:
            settings = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
            settings.pop("open_clip_version", None)
            encoder = cls(settings.pop("vision_cfg"), **settings)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                AttributeError) as exc:
            raise ValueError(f"{str(folder / CONFIG_FILE)!r} is not an encoder config: "
                             f"{exc}") from exc
        try:
            state = load_file(str(folder / WEIGHTS_FILE))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise ValueError(f"{str(folder / WEIGHTS_FILE)!r} is not a readable safetensors "
                             f"file: {exc}") from exc
        try:
            encoder.visual.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{str(folder / WEIGHTS_FILE)!r} does not fit the encoder: "
                             f"{exc}") from exc
        return encoder
