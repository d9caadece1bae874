"""The model every export is checked with: YOLOv8n with two DySample layers whose output depends on them."""

from __future__ import annotations

from pathlib import Path

from yolo_dysample.tools.export_matrix.cases import CALIBRATION_SHAPES

__all__ = ["bring_to_life", "build_dysample_checkpoint", "letterboxed_images", "perturb_offsets"]


def perturb_offsets(model, seed: int = 0) -> None:
    """Give every DySample offset (and scope) convolution weights that move points by ~0.5 px.

    Fresh DySample layers start at near-zero offsets, where they equal bilinear interpolation and a
    broken sampler could hide behind it; these weights make the sampling points real.
    """
    import torch

    from yolo_dysample.export_policy import dysample_layers

    generator = torch.Generator().manual_seed(seed)
    for layer in dysample_layers(model):
        convolutions = [layer.offset] + ([layer.scope] if layer.scope is not None else [])
        for convolution in convolutions:
            fan_in = convolution.weight.shape[1]
            with torch.no_grad():
                weight = torch.randn(convolution.weight.shape, generator=generator) * 2 / fan_in**0.5
                convolution.weight.copy_(weight)
                if convolution.bias is not None:  # the scope conv has none (as in the authors' code)
                    convolution.bias.copy_(torch.randn(convolution.bias.shape, generator=generator) * 0.5)


def bring_to_life(model) -> None:
    """Make a randomly initialised detection model's raw output depend on its input (and on DySample).

    A fresh YOLOv8n keeps BatchNorm's initial statistics (mean 0, variance 1) while its activations
    shrink layer after layer: at the DySample layers they are about 5e-9, and bus.jpg and an all-zero
    image give outputs 2.3e-5 apart, so a broken sampler (or export) could not be seen in them.
    Re-estimating every BatchNorm's statistics on ultralytics' sample photos (a cumulative average over
    :data:`CALIBRATION_SHAPES`, training mode, no gradients) brings the features to unit scale, as in a
    trained model. The class-score biases start at ``log(5 / nc / (640 / stride)**2)``, which pins every
    sigmoid score near 1e-5; zeroing them puts the scores where they move with the features.
    """
    import torch

    norms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: each calibration batch counts the same
    model.train()
    with torch.no_grad():
        for shape in CALIBRATION_SHAPES:
            model(letterboxed_images(shape))
        for branch in model.model[-1].cv3:
            branch[-1].bias.zero_()
    for norm in norms:
        norm.momentum = 0.03  # what ultralytics' initialize_weights sets
    model.eval()


def build_dysample_checkpoint(path: str | Path, seed: int = 0, dysample: bool = True) -> Path:
    """Write an Ultralytics checkpoint of YOLOv8n whose upsamplers are DySample, offsets perturbed.

    The stock ``nn.Upsample`` layers (10 and 13) become ``DySample(style="lp", dyscope=True)`` and
    ``DySample(style="pl")``; everything else, and the checkpoint layout, is stock. The model is
    built from ultralytics' own ``yolov8.yaml`` by path, so this needs no YAML lookup or registration.
    Its BatchNorm statistics are calibrated on the sample photos and its class biases zeroed
    (:func:`bring_to_life`), so the raw output depends on the input and on where DySample samples.
    ``dysample=False`` keeps the stock upsamplers (calibrated the same way): the baseline that tells a
    toolchain's own limits from DySample's. The same ``seed`` writes the same weights.
    """
    from copy import deepcopy

    import torch
    import ultralytics
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import ROOT, YAML

    from yolo_dysample import DySample

    torch.manual_seed(seed)
    config = YAML.load(ROOT / "cfg" / "models" / "v8" / "yolov8.yaml")
    config.update(scale="n", yaml_file="yolov8n.yaml")
    model = DetectionModel(config, ch=3, verbose=False)
    layers = model.model
    upsample_indices = [i for i, layer in enumerate(layers) if isinstance(layer, torch.nn.Upsample)]
    in_channels = {}
    hooks = [
        layers[i].register_forward_pre_hook(lambda module, inputs, i=i: in_channels.__setitem__(i, inputs[0].shape[1]))
        for i in upsample_indices
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    variants = [{"style": "lp", "dyscope": True}, {"style": "pl", "dyscope": False}]
    for index, variant in zip(upsample_indices if dysample else [], variants, strict=False):
        stock = layers[index]
        layer = DySample(in_channels[index], scale=2, groups=4, **variant)
        layer.f, layer.i, layer.type = stock.f, stock.i, "yolo_dysample.DySample"
        layer.np = sum(parameter.numel() for parameter in layer.parameters())
        layers[index] = layer
    perturb_offsets(model, seed)
    bring_to_life(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"model": deepcopy(model).half(), "train_args": {"task": "detect"}, "version": ultralytics.__version__}
    torch.save(checkpoint, path)  # the layout of ultralytics' Model.save
    return path


def letterboxed_images(shape: tuple[int, int, int]):
    """``(batch, 3, height, width)`` float tensor in [0, 1]: ultralytics' own sample photos, letterboxed."""
    import cv2
    import numpy as np
    import torch
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils import ASSETS

    batch, height, width = shape
    photos = [ASSETS / "bus.jpg", ASSETS / "zidane.jpg"]
    images = []
    for index in range(batch):
        image = cv2.imread(str(photos[index % len(photos)]))
        image = LetterBox(new_shape=(height, width), auto=False)(image=image)
        images.append(image[..., ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW
    return torch.from_numpy(np.ascontiguousarray(np.stack(images))).float() / 255.0
