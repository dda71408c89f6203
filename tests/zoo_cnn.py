"""Convolutional models of the test zoo (plain torch), small enough for 2 CPU cores.

Each entry of :func:`cnn_zoo` is ``(model, example input, name of a gated layer to close fully)``;
the input's channels are on dim 1, so ``lumos.gate(model, x, feature_dim=1)`` gates them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(n_in: int, n_out: int, dims: int = 2, **kwargs) -> list[nn.Module]:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    return [conv(n_in, n_out, 3, padding=1, **kwargs), bn(n_out), nn.ReLU()]


class CosmoFlowLike(nn.Module):
    """Conv3d + BatchNorm3d + pooling stack, then flatten and an FC regression head.

    Shapes: input ``(N, 2, 16, 16, 16)``, output ``(N, 4)``.
    """

    def __init__(self, n_in=2, n_out=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(n_in, 8, 3, padding=1), nn.BatchNorm3d(8), nn.LeakyReLU(0.1), nn.MaxPool3d(2),
            nn.Conv3d(8, 12, 3, padding=1), nn.BatchNorm3d(12), nn.LeakyReLU(0.1), nn.AvgPool3d(2),
            nn.Conv3d(12, 16, 3),  # no padding: constants of dropped inputs fold into the bias
            nn.ReLU(),
        )
        self.fc1 = nn.Linear(16 * 2 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, n_out)

    def forward(self, x):
        h = torch.flatten(self.features(x), 1)
        return self.fc2(F.relu(self.fc1(h)))


class UNet2d(nn.Module):
    """Two-level U-Net: concatenated skips, ConvTranspose2d upsampling, a GroupNorm level.

    Shapes: input ``(N, 3, 16, 16)``, output ``(N, 2, 16, 16)``.
    """

    def __init__(self, n_in=3, n_out=2):
        super().__init__()
        self.enc1 = nn.Sequential(*_conv_bn_relu(n_in, 8), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.bottom = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(24, 16, 2, stride=2)
        self.dec2 = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec1 = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, n_out, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


class VGGLike(nn.Module):
    """conv-BN-ReLU blocks with max pooling, ``x.view(x.size(0), -1)``, an FC classifier.

    Shapes: input ``(N, 3, 16, 16)``, output ``(N, 10)``.
    """

    def __init__(self, n_in=3, n_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(n_in, 16), *_conv_bn_relu(16, 16), nn.MaxPool2d(2),
            *_conv_bn_relu(16, 32), nn.MaxPool2d(2),
            *_conv_bn_relu(32, 32), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Dropout(0.2),
                                        nn.Linear(64, n_classes))

    def forward(self, x):
        h = self.features(x)
        return self.classifier(h.view(h.size(0), -1))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection shortcut when the width or stride changes."""

    def __init__(self, n_in: int, n_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(n_out)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(n_out)
        self.shortcut = nn.Identity()
        if stride != 1 or n_in != n_out:
            self.shortcut = nn.Sequential(nn.Conv2d(n_in, n_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(n_out))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNetLike(nn.Module):
    """Stem, an identity block, a strided block with projection shortcut, global pooling, FC.

    Shapes: input ``(N, 3, 16, 16)``, output ``(N, 10)``.
    """

    def __init__(self, n_in=3, n_classes=10):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(n_in, 16))
        self.block1 = BasicBlock(16, 16)
        self.block2 = BasicBlock(16, 32, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32, n_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.block2(self.block1(self.stem(x))))))


class EncoderDecoder(nn.Module):
    """Strided conv encoder, transposed-conv + upsample decoder, no skips (denoising shape).

    Shapes: input ``(N, 2, 16, 16)``, output ``(N, 2, 16, 16)``.
    """

    def __init__(self, channels=2):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 12, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(12, 24, 3, stride=2, padding=1), nn.Tanh(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(24, 12, 4, stride=2, padding=1), nn.ELU(),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(12, 8, 3, padding=1, padding_mode="replicate"), nn.ReLU(),
            nn.Conv2d(8, channels, 3, padding=1),
        )

    def forward(self, x):
        return self.decoder(self.encoder(x))


class Signal1d(nn.Module):
    """Conv1d stack with GroupNorm, average pooling, adaptive pooling and an FC head.

    Shapes: input ``(N, 4, 32)``, output ``(N, 3)``.
    """

    def __init__(self, n_in=4, n_out=3):
        super().__init__()
        self.conv1 = nn.Conv1d(n_in, 12, 5, padding=2)
        self.norm1 = nn.GroupNorm(3, 12)
        self.conv2 = nn.Conv1d(12, 16, 3, dilation=2)
        self.conv3 = nn.Conv1d(16, 16, 3, padding="same", bias=False)
        self.fc = nn.Linear(16 * 4, n_out)

    def forward(self, x):
        h = F.gelu(self.norm1(self.conv1(x)))
        h = F.avg_pool1d(torch.relu(self.conv2(h)), 2)
        h = F.adaptive_max_pool1d(torch.tanh(self.conv3(h)), 4)
        return self.fc(h.reshape(h.shape[0], -1))


def _randomize_norm_stats(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (so closed channels hold constants)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.5, 0.5, generator=generator)


def cnn_zoo() -> dict[str, tuple[nn.Module, torch.Tensor, str]]:
    """Name -> (dense model in eval mode, example input, a conv layer to close fully)."""
    torch.manual_seed(11)
    generator = torch.Generator().manual_seed(11)
    entries = {
        "cosmoflow3d": (CosmoFlowLike(), torch.randn(4, 2, 16, 16, 16), "model.features.4"),
        "unet2d": (UNet2d(), torch.randn(4, 3, 16, 16), "model.enc2.0"),
        "vgg": (VGGLike(), torch.randn(4, 3, 16, 16), "model.features.3"),
        "resnet": (ResNetLike(), torch.randn(4, 3, 16, 16), "model.block1.conv1"),
        "encoder_decoder": (EncoderDecoder(), torch.randn(4, 2, 16, 16), "model.decoder.0"),
        "signal1d": (Signal1d(), torch.randn(4, 4, 32), "model.conv2"),
    }
    for model, _, _ in entries.values():
        _randomize_norm_stats(model, generator)
        model.eval()
    return entries
