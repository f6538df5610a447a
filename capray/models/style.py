"""The style network: feature maps whose Gram matrices define CAP's consistency loss.

Torchvision VGG-19 (the paper's choice; first five conv layers by default) or ResNet-50 (paper
Table 4). Weights: 'imagenet' from the torchvision cache (no download is attempted when offline
unless torchvision can reach its URL), a local state-dict file, or 'random' for tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from capray.config import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision vgg19().features indices of each conv layer (the activation taken is the ReLU after it)
VGG19_CONV_INDEX = {
    "conv1_1": 0, "conv1_2": 2, "conv2_1": 5, "conv2_2": 7, "conv3_1": 10, "conv3_2": 12, "conv3_3": 14,
    "conv3_4": 16, "conv4_1": 19, "conv4_2": 21, "conv4_3": 23, "conv4_4": 25, "conv5_1": 28,
}


class StyleFeatures(nn.Module):
    """Maps images in [-1, 1] to the list of feature maps at the configured layers."""

    def __init__(self, body: nn.Module, taps: list[str], kind: str):
        super().__init__()
        self.body, self.taps, self.kind = body, taps, kind
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = ((images + 1) / 2 - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        if self.kind == "vgg19":
            wanted = {VGG19_CONV_INDEX[name] + 1: name for name in self.taps}  # +1: after the ReLU
            feats: dict[str, torch.Tensor] = {}
            for idx, layer in enumerate(self.body):
                x = layer(x)
                if idx in wanted:
                    feats[wanted[idx]] = x
                    if len(feats) == len(wanted):
                        break
            return [feats[name] for name in self.taps]
        feats = {}
        body = self.body
        x = body.relu(body.bn1(body.conv1(x)))
        feats["conv1"] = x
        x = body.maxpool(x)
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            if all(t in feats for t in self.taps):
                break
            x = getattr(body, stage)(x)
            feats[stage] = x
        return [feats[name] for name in self.taps]


def load_style_network(cfg: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> StyleFeatures:
    import torchvision

    layers = cfg.effective_style_layers()
    if cfg.style_network == "vgg19":
        unknown = [name for name in layers if name not in VGG19_CONV_INDEX]
        builder, weights_enum = torchvision.models.vgg19, torchvision.models.VGG19_Weights.IMAGENET1K_V1
    else:
        unknown = [name for name in layers if name not in ("conv1", "layer1", "layer2", "layer3", "layer4")]
        builder, weights_enum = torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    if unknown:
        raise ValueError(f"unknown {cfg.style_network} layers {unknown}")

    if cfg.style_weights == "imagenet":
        try:
            net = builder(weights=weights_enum)
        except Exception as exc:  # offline and not in the torch cache
            raise RuntimeError(
                f"ImageNet weights for {cfg.style_network} are unavailable ({exc}); put them in the torch "
                "cache, give model.style_weights a state-dict path, or use 'random' for tests"
            ) from exc
    else:
        with torch.random.fork_rng(devices=[]):  # 'random' is deterministic and leaves global RNG alone
            torch.manual_seed(0)
            net = builder(weights=None)
        if cfg.style_weights != "random":
            path = Path(cfg.style_weights)
            if not path.is_file():
                raise FileNotFoundError(f"style network state dict {path} not found")
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if cfg.style_network == "vgg19":  # keep only the layers up to the deepest tap
        body = net.features[: max(VGG19_CONV_INDEX[name] for name in layers) + 2]
    else:
        net.fc = nn.Identity()
        body = net
    model = StyleFeatures(body, layers, cfg.style_network)
    return model.requires_grad_(False).eval().to(device=device, dtype=dtype)
