"""Architectures people copy, small enough for 2 CPU cores but built like the originals.

Written for lumos from the papers' block diagrams and torchvision's module structure (same
submodule names, the same reuse of one ``nn.ReLU(inplace=True)`` per block, ``out += identity``,
``x.size()``-based reshapes, ``torch.flatten(x, 1)``, functional pooling), not copied. They
judge compaction: a rule written for these models' author would pass by construction, so the
models follow the originals, not lumos.

:func:`architectures` maps a name to an :class:`Architecture`: a factory for the dense model
(eval mode, seeded, with trained-looking normalisation statistics so that a closed channel
holds a non-zero constant), its example inputs, and fresh inputs of another batch size and,
where the model allows it, another spatial size or sequence length.

Sources: ResNet (He et al. 2016; torchvision ``resnet.py``), MobileNetV2 (Sandler et al. 2018),
ShuffleNetV2 (Ma et al. 2018), EfficientNet MBConv + squeeze-excite (Tan & Le 2019; Hu et al.
2018), ConvNeXt (Liu et al. 2022), RegNetX (Radosavovic et al. 2020), DenseNet (Huang et al.
2017), U-Net (Ronneberger et al. 2015, the widely copied padded variant), ViT (Dosovitskiy et
al. 2021; torchvision ``vision_transformer.py``), and ``nn.TransformerEncoder`` /
``nn.TransformerDecoder`` / ``nn.Transformer`` (Vaswani et al. 2017) used as torch documents.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from zoo_cnn import _randomize_norm_stats

IMAGE_CHANNELS, CLASSES = 3, 10
SEQ_FEATURES, TGT_FEATURES, SEQ_OUTPUTS = 6, 5, 3
EXAMPLE_BATCH, FRESH_BATCH = 4, 3


# -- shared building blocks ----------------------------------------------------------------------
def conv3x3(n_in: int, n_out: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(n_in: int, n_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 1, stride=stride, bias=False)


class ConvNormActivation(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + an in-place activation (torchvision's Conv2dNormActivation)."""

    def __init__(self, n_in: int, n_out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation: type[nn.Module] | None = nn.ReLU):
        layers = [nn.Conv2d(n_in, n_out, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(n_out)]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class StochasticDepth(nn.Module):
    """Drops whole residual branches per sample in training (Huang et al. 2016); identity in eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x * noise.bernoulli_(survival).div_(survival)


class FeatureRecorder:
    """A forward hook that keeps the last output of the layer it is registered on (feature extraction)."""

    def __init__(self):
        self.last: torch.Tensor | None = None

    def __call__(self, module, inputs, output):
        self.last = output.detach()


# -- ResNet (torchvision structure) --------------------------------------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 convs; one ``ReLU(inplace=True)`` module used twice; ``out += identity``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, ResNet v1.5), 1x1 expand by 4; one ReLU module used three times."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """7x7/2 stem, max pooling, two stages (the second strided, with a conv1x1 + BN downsample),
    adaptive average pooling, ``torch.flatten(x, 1)``, FC.

    Shapes: input ``(N, 3, H, W)`` with H, W >= 8; output ``(N, 10)``.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int], widths: tuple[int, int],
                 stem: int = 8, num_classes: int = CLASSES):
        super().__init__()
        self.inplanes = stem
        self.conv1 = nn.Conv2d(IMAGE_CHANNELS, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[1] * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet_basic(scale: int = 1) -> ResNet:
    """ResNet with basic blocks (2, 1) and a feature-recording forward hook on ``layer1``."""
    model = ResNet(BasicBlock, (2, 1), (8 * scale, 16 * scale), stem=8 * scale)
    model.layer1.register_forward_hook(FeatureRecorder())
    return model


def resnet_bottleneck(scale: int = 1) -> ResNet:
    """ResNet with bottleneck blocks (2, 1); ``layer1`` starts with a width-changing downsample."""
    return ResNet(Bottleneck, (2, 1), (4 * scale, 8 * scale), stem=8 * scale)


# -- MobileNetV2 ---------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    """Expand 1x1 (unless the ratio is 1), depthwise 3x3, linear 1x1 projection; residual when the
    stride is 1 and the widths are equal. ReLU6 in place."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(inp, hidden, 1, activation=nn.ReLU6))
        layers += [ConvNormActivation(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Shapes: input ``(N, 3, H, W)`` with H, W >= 4; output ``(N, 10)``."""

    def __init__(self, scale: int = 1, num_classes: int = CLASSES):
        super().__init__()
        # expansion t, output width c, repeats n, first stride s (the paper's table, shortened)
        settings = [(1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 1)]
        width = 8 * scale
        features: list[nn.Module] = [ConvNormActivation(IMAGE_CHANNELS, width, stride=2, activation=nn.ReLU6)]
        for t, c, n, s in settings:
            for i in range(n):
                features.append(InvertedResidual(width, c * scale, s if i == 0 else 1, t))
                width = c * scale
        self.last_channel = 32 * scale
        features.append(ConvNormActivation(width, self.last_channel, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# -- ShuffleNetV2 --------------------------------------------------------------------------------
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


class ShuffleUnit(nn.Module):
    """Stride 1: split the channels in two (``chunk``), transform one half; stride 2: two
    downsampling branches. Concatenate, then shuffle the channels."""

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__()
        self.stride = stride
        branch_features = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, 1, bias=False), nn.BatchNorm2d(branch_features), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch_features, branch_features, 1, bias=False),
            nn.BatchNorm2d(branch_features), nn.ReLU(inplace=True),
            nn.Conv2d(branch_features, branch_features, 3, stride, 1, groups=branch_features, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, 1, bias=False), nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """Stem conv + max pooling, two stages (stride-2 unit, stride-1 unit), conv5, mean, FC.

    Shapes: input ``(N, 3, H, W)`` with H, W >= 8; output ``(N, 10)``.
    """

    def __init__(self, scale: int = 1, num_classes: int = CLASSES):
        super().__init__()
        stem, widths, last = 8 * scale, (16 * scale, 32 * scale), 64 * scale
        self.conv1 = nn.Sequential(nn.Conv2d(IMAGE_CHANNELS, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage2 = nn.Sequential(ShuffleUnit(stem, widths[0], 2), ShuffleUnit(widths[0], widths[0], 1))
        self.stage3 = nn.Sequential(ShuffleUnit(widths[0], widths[1], 2), ShuffleUnit(widths[1], widths[1], 1))
        self.conv5 = nn.Sequential(nn.Conv2d(widths[1], last, 1, bias=False), nn.BatchNorm2d(last),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage3(self.stage2(x)))
        x = x.mean([2, 3])
        return self.fc(x)


# -- EfficientNet MBConv -------------------------------------------------------------------------
class SqueezeExcitation(nn.Module):
    """``x * sigmoid(fc2(silu(fc1(pool(x)))))`` with 1x1 convs as the two FC layers."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


class MBConv(nn.Module):
    """Expand 1x1, depthwise kxk, squeeze-excite, linear 1x1 projection (SiLU); a residual with
    stochastic depth when the stride is 1 and the widths are equal."""

    def __init__(self, inp: int, oup: int, expand_ratio: int, kernel: int, stride: int, sd_prob: float):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if hidden != inp:
            layers.append(ConvNormActivation(inp, hidden, 1, activation=nn.SiLU))
        layers += [ConvNormActivation(hidden, hidden, kernel, stride, groups=hidden, activation=nn.SiLU),
                   SqueezeExcitation(hidden, max(1, inp // 4)),
                   ConvNormActivation(hidden, oup, 1, activation=None)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


class EfficientNet(nn.Module):
    """Stem, three MBConv blocks (expand 1; expand 4 stride 2; expand 4 kernel 5 residual), head
    conv, pooling, dropout, FC. Shapes: input ``(N, 3, H, W)`` with H, W >= 4; output ``(N, 10)``."""

    def __init__(self, scale: int = 1, num_classes: int = CLASSES):
        super().__init__()
        w1, w2, last = 8 * scale, 12 * scale, 48 * scale
        self.features = nn.Sequential(
            ConvNormActivation(IMAGE_CHANNELS, w1, 3, 2, activation=nn.SiLU),
            MBConv(w1, w1, 1, 3, 1, sd_prob=0.05),
            MBConv(w1, w2, 4, 3, 2, sd_prob=0.1),
            MBConv(w2, w2, 4, 5, 1, sd_prob=0.15),
            ConvNormActivation(w2, last, 1, activation=nn.SiLU))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2, inplace=True), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# -- ConvNeXt ------------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (permute to channels-last and back)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm, Linear 4x, GELU, Linear, layer scale ``gamma``,
    back to channels-first, residual (with stochastic depth)."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init * torch.ones(dim))
        self.drop_path = StochasticDepth(drop_path)

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class ConvNeXt(nn.Module):
    """Patchify stem (4x4/4 conv + LayerNorm2d), two stages with a LayerNorm2d + 2x2/2 conv
    downsample between them, global mean, LayerNorm, head.

    Shapes: input ``(N, 3, H, W)`` with H, W multiples of 8; output ``(N, 10)``.
    """

    def __init__(self, scale: int = 1, num_classes: int = CLASSES):
        super().__init__()
        d1, d2 = 16 * scale, 32 * scale
        self.stem = nn.Sequential(nn.Conv2d(IMAGE_CHANNELS, d1, 4, stride=4), LayerNorm2d(d1, eps=1e-6))
        self.stage1 = nn.Sequential(ConvNeXtBlock(d1, 0.0), ConvNeXtBlock(d1, 0.05))
        self.downsample = nn.Sequential(LayerNorm2d(d1, eps=1e-6), nn.Conv2d(d1, d2, 2, stride=2))
        self.stage2 = nn.Sequential(ConvNeXtBlock(d2, 0.1))
        self.norm = nn.LayerNorm(d2, eps=1e-6)
        self.head = nn.Linear(d2, num_classes)

    def forward(self, x):
        x = self.stage2(self.downsample(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean([-2, -1])))


# -- RegNetX -------------------------------------------------------------------------------------
class ResBottleneckBlock(nn.Module):
    """RegNetX block: 1x1, grouped 3x3 (groups of ``group_width`` channels, strided), 1x1 without
    activation; a conv1x1 + BN projection when the width or stride changes; ReLU after the add."""

    def __init__(self, w_in: int, w_out: int, stride: int, group_width: int):
        super().__init__()
        self.proj = None
        if w_in != w_out or stride != 1:
            self.proj = ConvNormActivation(w_in, w_out, 1, stride, activation=None)
        self.f = nn.Sequential(OrderedDict(
            a=ConvNormActivation(w_in, w_out, 1),
            b=ConvNormActivation(w_out, w_out, 3, stride, groups=w_out // group_width),
            c=ConvNormActivation(w_out, w_out, 1, activation=None)))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class RegNetX(nn.Module):
    """Stem, two stages of ResBottleneckBlocks (group width 4 then 8), pooling, FC.

    Shapes: input ``(N, 3, H, W)`` with H, W >= 8; output ``(N, 10)``.
    """

    def __init__(self, scale: int = 1, num_classes: int = CLASSES):
        super().__init__()
        stem, w1, w2 = 8 * scale, 16 * scale, 32 * scale
        self.stem = ConvNormActivation(IMAGE_CHANNELS, stem, 3, 2)
        self.trunk_output = nn.Sequential(OrderedDict(
            block1=nn.Sequential(ResBottleneckBlock(stem, w1, 2, 4 * scale), ResBottleneckBlock(w1, w1, 1, 4 * scale)),
            block2=nn.Sequential(ResBottleneckBlock(w1, w2, 2, 8 * scale))))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x):
        x = self.avgpool(self.trunk_output(self.stem(x)))
        return self.fc(x.flatten(start_dim=1))


# -- DenseNet ------------------------------------------------------------------------------------
class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bottleneck) then BN-ReLU-conv3x3 on the concatenation of all previous features."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        concated = torch.cat(features, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    """Each layer reads the concatenation of the block input and every earlier layer's output."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size))

    def forward(self, init_features):
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """7x7/2 stem + max pooling, dense block, transition, dense block, final BN, in-place ReLU,
    adaptive pooling, FC. Shapes: input ``(N, 3, H, W)`` with H, W >= 16; output ``(N, 10)``."""

    def __init__(self, scale: int = 1, growth_rate: int = 4, block_config=(2, 2), bn_size: int = 2,
                 num_classes: int = CLASSES):
        super().__init__()
        growth_rate *= scale
        num_features = 8 * scale
        self.features = nn.Sequential(OrderedDict(
            conv0=nn.Conv2d(IMAGE_CHANNELS, num_features, 7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(num_features), relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(kernel_size=3, stride=2, padding=1)))
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(num_layers, num_features, bn_size, growth_rate))
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


# -- U-Net ---------------------------------------------------------------------------------------
class DoubleConv(nn.Sequential):
    def __init__(self, n_in: int, n_out: int):
        super().__init__(nn.Conv2d(n_in, n_out, 3, padding=1, bias=False), nn.BatchNorm2d(n_out), nn.ReLU(inplace=True),
                         nn.Conv2d(n_out, n_out, 3, padding=1, bias=False), nn.BatchNorm2d(n_out), nn.ReLU(inplace=True))


class Down(nn.Sequential):
    def __init__(self, n_in: int, n_out: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(n_in, n_out))


class Up(nn.Module):
    """ConvTranspose2d upsampling, zero-pad to the skip's size (odd sizes), concatenate, DoubleConv."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(n_in, n_in // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(n_in, n_out)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        diff_y = x2.size()[2] - x1.size()[2]
        diff_x = x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class UNet(nn.Module):
    """Three-level U-Net with concatenated skips. Shapes: input ``(N, 3, H, W)``, H, W >= 4
    (any size: the decoder pads); output ``(N, 2, H, W)``."""

    def __init__(self, scale: int = 1, n_classes: int = 2):
        super().__init__()
        w1, w2, w3 = 8 * scale, 16 * scale, 32 * scale
        self.inc = DoubleConv(IMAGE_CHANNELS, w1)
        self.down1 = Down(w1, w2)
        self.down2 = Down(w2, w3)
        self.up1 = Up(w3, w2)
        self.up2 = Up(w2, w1)
        self.outc = nn.Conv2d(w1, n_classes, kernel_size=1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x = self.up1(x3, x2)
        x = self.up2(x, x1)
        return self.outc(x)


# -- Vision Transformer (torchvision structure) --------------------------------------------------
class MLPBlock(nn.Sequential):
    def __init__(self, dim: int, mlp_dim: int, dropout: float):
        super().__init__(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
                         nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    """Pre-norm: ``x = x + attn(ln_1(x))``, ``x = x + mlp(ln_2(x))``."""

    def __init__(self, num_heads: int, dim: int, mlp_dim: int, dropout: float, attention_dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_dim, dropout)

    def forward(self, input):
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.mlp(self.ln_2(x))
        return x + y


class Encoder(nn.Module):
    def __init__(self, seq_length: int, num_layers: int, num_heads: int, dim: int, mlp_dim: int,
                 dropout: float, attention_dropout: float):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, dim, mlp_dim, dropout, attention_dropout))
            for i in range(num_layers)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, input):
        return self.ln(self.layers(self.dropout(input + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """Conv patch embedding, class token, learned positions, pre-norm encoder, head on the class token.

    Shapes: input ``(N, 3, image_size, image_size)`` (the position embedding fixes the size);
    output ``(N, 10)``.
    """

    def __init__(self, scale: int = 1, image_size: int = 16, patch_size: int = 4, num_layers: int = 2,
                 num_heads: int = 4, num_classes: int = CLASSES):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.hidden_dim = hidden_dim = 32 * scale
        self.conv_proj = nn.Conv2d(IMAGE_CHANNELS, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        seq_length = (image_size // patch_size) ** 2 + 1
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, 2 * hidden_dim, 0.1, 0.1)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))

    def _process_input(self, x):
        n, c, h, w = x.shape
        p = self.patch_size
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        n_h, n_w = h // p, w // p
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, n_h * n_w)
        return x.permute(0, 2, 1)

    def forward(self, x):
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        return self.heads(x[:, 0])


# -- torch's Transformer layers, used as their documentation shows -------------------------------
MAX_LEN = 32


class SequenceEncoder(nn.Module):
    """Linear feature embedding, learned positions, ``nn.TransformerEncoder`` (batch_first), head.

    ``norm_first=False``: post-norm ReLU layers, a key padding mask, masked mean pooling.
    ``norm_first=True``: pre-norm GELU layers with a final LayerNorm, a causal mask, the last
    position's output.

    Shapes: ``x (N, L, 6)``, ``padding_mask (N, L)`` bool (True = padding; post-norm only);
    output ``(N, 3)``.
    """

    def __init__(self, norm_first: bool, scale: int = 1, num_layers: int = 2, nhead: int = 4):
        super().__init__()
        d_model = 32 * scale
        self.norm_first = norm_first
        self.embed = nn.Linear(SEQ_FEATURES, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, MAX_LEN, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=2 * d_model, dropout=0.1,
                                           activation="gelu" if norm_first else "relu", batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model) if norm_first else None,
                                             enable_nested_tensor=not norm_first)
        self.head = nn.Linear(d_model, SEQ_OUTPUTS)

    def forward(self, x, padding_mask=None):
        h = self.embed(x) + self.pos[:, :x.size(1)]
        if self.norm_first:
            causal = nn.Transformer.generate_square_subsequent_mask(x.size(1), device=x.device)
            return self.head(self.encoder(h, mask=causal, is_causal=True)[:, -1])
        h = self.encoder(h, src_key_padding_mask=padding_mask)
        keep = (~padding_mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class Seq2Seq(nn.Module):
    """``nn.Transformer`` (post-norm encoder-decoder, batch_first) between linear embeddings and a
    linear head, a causal target mask. Shapes: ``src (N, S, 6)``, ``tgt (N, T, 5)``; output ``(N, T, 3)``."""

    def __init__(self, scale: int = 1, nhead: int = 4):
        super().__init__()
        d_model = 32 * scale
        self.src_embed = nn.Linear(SEQ_FEATURES, d_model)
        self.tgt_embed = nn.Linear(TGT_FEATURES, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, MAX_LEN, d_model))
        self.transformer = nn.Transformer(d_model, nhead, num_encoder_layers=1, num_decoder_layers=2,
                                          dim_feedforward=2 * d_model, dropout=0.1, batch_first=True)
        self.head = nn.Linear(d_model, SEQ_OUTPUTS)

    def forward(self, src, tgt):
        tgt_mask = self.transformer.generate_square_subsequent_mask(tgt.size(1), device=tgt.device)
        s = self.src_embed(src) + self.pos[:, :src.size(1)]
        t = self.tgt_embed(tgt) + self.pos[:, :tgt.size(1)]
        return self.head(self.transformer(s, t, tgt_mask=tgt_mask, tgt_is_causal=True))


class ConditionedDecoder(nn.Module):
    """A pre-norm ``nn.TransformerDecoder`` (GELU, final LayerNorm) over a target sequence,
    cross-attending to an embedded context sequence with a memory key padding mask.

    Shapes: ``tgt (N, T, 5)``, ``context (N, S, 6)``, ``context_padding (N, S)`` bool;
    output ``(N, T, 3)``.
    """

    def __init__(self, scale: int = 1, nhead: int = 4):
        super().__init__()
        d_model = 32 * scale
        self.tgt_embed = nn.Linear(TGT_FEATURES, d_model)
        self.context_embed = nn.Linear(SEQ_FEATURES, d_model)
        layer = nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward=2 * d_model, dropout=0.1,
                                           activation=F.gelu, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers=2, norm=nn.LayerNorm(d_model))
        self.head = nn.Linear(d_model, SEQ_OUTPUTS)

    def forward(self, tgt, context, context_padding):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1), device=tgt.device)
        h = self.decoder(self.tgt_embed(tgt), self.context_embed(context), tgt_mask=causal, tgt_is_causal=True,
                         memory_key_padding_mask=context_padding)
        return self.head(h)


# -- the zoo -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """One zoo entry.

    Attributes:
        name: the zoo key.
        factory: ``factory(scale)`` builds the dense model (widths times ``scale``).
        make_inputs: ``make_inputs(batch, size, seed)``: the model's inputs, ``size`` being the
            image side or the sequence length.
        example_size, fresh_size: the size of the example inputs, and another one the model
            accepts (equal when the model fixes it, e.g. a ViT's position embedding).
        feature_dim: the dimension of the first input that holds its features (gated by lumos).
    """

    name: str
    factory: Callable[[int], nn.Module]
    make_inputs: Callable[[int, int, int], tuple]
    example_size: int
    fresh_size: int
    feature_dim: int

    def build(self, scale: int = 1, seed: int = 0) -> nn.Module:
        """The dense model in eval mode, seeded, with trained-looking normalisation parameters."""
        torch.manual_seed(seed)
        model = self.factory(scale)
        _look_trained(model, torch.Generator().manual_seed(seed))
        return model.eval()

    def example_inputs(self, batch: int = EXAMPLE_BATCH) -> tuple:
        return self.make_inputs(batch, self.example_size, 0)

    def fresh_inputs(self, batch: int = FRESH_BATCH) -> tuple:
        """Inputs the model was not traced with: another batch size and (where valid) size."""
        return self.make_inputs(batch, self.fresh_size, 1)


@torch.no_grad()
def _look_trained(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial norm statistics and affine parameters, layer scales and class tokens, so that a
    closed channel carries a non-zero constant and no branch is negligibly small."""
    _randomize_norm_stats(model, generator)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            module.weight.uniform_(0.5, 1.5, generator=generator)
            if module.bias is not None:
                module.bias.uniform_(-0.5, 0.5, generator=generator)
        if isinstance(module, ConvNeXtBlock):
            module.gamma.uniform_(0.5, 1.0, generator=generator)
        if isinstance(module, VisionTransformer):
            module.class_token.normal_(0.0, 0.5, generator=generator)


def _images(batch: int, size: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, IMAGE_CHANNELS, size, size, generator=g),)


def _padding_mask(batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    """Bool ``(batch, length)``, True on each sequence's padded tail (at least one real token)."""
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length  # one full sequence
    return torch.arange(length)[None, :] >= lengths[:, None]


def _sequence_with_padding(batch: int, length: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, SEQ_FEATURES, generator=g), _padding_mask(batch, length, g)


def _sequence(batch: int, length: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, length, SEQ_FEATURES, generator=g),)


def _source_and_target(batch: int, length: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, length, SEQ_FEATURES, generator=g),
            torch.randn(batch, length - 2, TGT_FEATURES, generator=g))


def _target_and_context(batch: int, length: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, length + 3, SEQ_FEATURES, generator=g)
    return (torch.randn(batch, length, TGT_FEATURES, generator=g), context,
            _padding_mask(batch, length + 3, g))


ARCHITECTURES = (
    Architecture("resnet_basic", resnet_basic, _images, 32, 24, 1),
    Architecture("resnet_bottleneck", resnet_bottleneck, _images, 32, 24, 1),
    Architecture("mobilenet_v2", MobileNetV2, _images, 32, 24, 1),
    Architecture("shufflenet_v2", ShuffleNetV2, _images, 32, 24, 1),
    Architecture("efficientnet_mbconv", EfficientNet, _images, 32, 24, 1),
    Architecture("convnext", ConvNeXt, _images, 32, 24, 1),
    Architecture("regnetx", RegNetX, _images, 32, 24, 1),
    Architecture("densenet", DenseNet, _images, 32, 24, 1),
    Architecture("unet", UNet, _images, 16, 18, 1),
    Architecture("vit", VisionTransformer, _images, 16, 16, 1),
    Architecture("transformer_encoder_postnorm", lambda scale: SequenceEncoder(False, scale),
                 _sequence_with_padding, 12, 9, -1),
    Architecture("transformer_encoder_prenorm", lambda scale: SequenceEncoder(True, scale), _sequence, 12, 9, -1),
    Architecture("transformer_seq2seq", Seq2Seq, _source_and_target, 12, 9, -1),
    Architecture("transformer_decoder_prenorm", ConditionedDecoder, _target_and_context, 10, 7, -1),
)


def architectures() -> dict[str, Architecture]:
    """Name -> :class:`Architecture`, in the order of the module docstring."""
    return {a.name: a for a in ARCHITECTURES}


@torch.no_grad()
def close_half_of_every_gate(gated: nn.Module, seed: int = 0, open_logit: float = 8.0,
                             closed_logit: float = -8.0) -> None:
    """Every gate of ``gated``: a seeded random ``n // 2`` of its units closed (``log_alpha`` at
    ``closed_logit``, eval mask exactly 0), the others open (``open_logit``, eval mask exactly 1)."""
    import lumos

    g = torch.Generator().manual_seed(seed)
    for _, gate in lumos.gates_of(gated):
        closed = torch.randperm(gate.n, generator=g)[:gate.n // 2]
        gate.log_alpha.fill_(open_logit)
        gate.log_alpha[closed.to(gate.log_alpha.device)] = closed_logit


def gated_layer_params(gated: nn.Module) -> int:
    """Parameters (gate logits excluded) of the layers of ``gated`` that carry gates, the input
    feature gate excluded: how much of a model lumos can shrink."""
    import lumos

    total = 0
    for module in gated.modules():
        gates = [c for c in module.children() if isinstance(c, lumos.HardConcreteGate)]
        if not gates or isinstance(module, lumos.nn.FeatureGate):
            continue
        gate_params = {id(p) for gate in gates for p in gate.parameters()}
        total += sum(p.numel() for p in module.parameters() if id(p) not in gate_params)
    return total


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius norms over all elements)."""
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
