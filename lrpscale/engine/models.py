"""VGG models for LRP: building them, loading weights, folding BatchNorm, naming layers.

Every model leaves here in eval mode with BatchNorm already folded into the preceding
convolution, so the LRP engine only ever sees conv, ReLU, pooling and linear layers.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import re
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import vgg as tv_vgg

from lrpscale.config import MODEL_NAMES

VGG_NAMES = MODEL_NAMES
_CFG_OF = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}
VGG_CONVS = {"vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16}  # conv layers of each architecture

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ASSETS = Path(__file__).parent.parent / "assets"


@dataclass(frozen=True)
class DemoWeights:
    """A bundled demo model: its file, the checksum it must have and how it was built."""

    file: str
    sha256: str
    classes: list[str]
    num_classes: int
    width_divisor: int
    hidden: int
    image_size: int
    test_accuracy: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]



def demo_spec(weights: str) -> DemoWeights:
    """The bundled model named by ``demo`` (the digits model) or ``demo-<dataset>``."""
    key = "digits" if weights == "demo" else weights.removeprefix("demo-")
    bundled = demo_models()
    if key not in bundled:
        raise WeightsError(f"no bundled demo model {weights!r}; available: "
                           + (", ".join(f"demo-{k}" for k in bundled) + " (demo = demo-digits)" if bundled else "none"))
    return bundled[key]


def demo_models() -> dict[str, DemoWeights]:
    """The bundled demo models, keyed by dataset, as scripts/train_demo_models.py recorded them."""
    manifest = ASSETS / "demo_models.json"
    if not manifest.is_file():
        return {}
    entries = json.loads(manifest.read_text())
    return {key: DemoWeights(**{**e, "mean": tuple(e["mean"]), "std": tuple(e["std"])}) for key, e in entries.items()}


class WeightsError(ValueError):
    """A weights argument that cannot be turned into a model."""


def _make_features(cfg: list, batch_norm: bool, width_divisor: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        width = max(1, v // width_divisor)
        layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        channels = width
    return nn.Sequential(*layers)


def build_vgg(
    name: str = "vgg16",
    num_classes: int = 1000,
    width_divisor: int = 1,
    hidden: int = 4096,
    pooled_size: int = 7,
    init: bool = True,
) -> tv_vgg.VGG:
    """Build an untrained torchvision VGG, optionally narrowed for small images.

    ``width_divisor`` divides every conv width; ``hidden`` is the width of fc6/fc7 and
    ``pooled_size`` the side of the adaptive average pool before fc6. The defaults give
    torchvision's exact architecture; the module names (``features.N``, ``classifier.N``) are the
    same for every setting, so layer names and aliases carry over to the narrow demo models.
    ``init=False`` skips the random initialisation when weights are loaded right after.
    """
    base, _, bn = name.partition("_")
    if base not in _CFG_OF or bn not in ("", "bn"):
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(VGG_NAMES)}")
    cfg = tv_vgg.cfgs[_CFG_OF[base]]
    features = _make_features(cfg, bn == "bn", width_divisor)
    if (width_divisor, hidden, pooled_size) == (1, 4096, 7):
        return tv_vgg.VGG(features, num_classes=num_classes, init_weights=init)
    # torchvision's VGG always builds the 25088 x 4096 classifier: build it on the meta device
    # (no memory, no initialisation) and put the narrow one in its place
    with torch.device("meta"):
        model = tv_vgg.VGG(nn.Sequential(), num_classes=num_classes, init_weights=False)
    channels = max(1, 512 // width_divisor)
    model.features = features
    model.avgpool = nn.AdaptiveAvgPool2d((pooled_size, pooled_size))
    model.classifier = nn.Sequential(
        nn.Linear(channels * pooled_size * pooled_size, hidden),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(hidden, num_classes),
    )
    if init:
        _init_like_torchvision(model)
    return model


def _init_like_torchvision(model: nn.Module) -> None:
    """torchvision's VGG initialisation (kaiming for convs, N(0, 0.01) for linear layers)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d of ``model.features`` into the conv before it, in place.

    The BatchNorm is replaced by ``nn.Identity`` so module indices (and layer names) stay put.
    In eval mode the folded model computes the same logits: w' = w * g / sqrt(var + eps),
    b' = (b - mean) * g / sqrt(var + eps) + beta.
    """
    features = model.features
    previous_conv = None
    for index, module in enumerate(features):
        if isinstance(module, nn.Conv2d):
            previous_conv = module
        elif isinstance(module, nn.BatchNorm2d):
            if previous_conv is None:
                raise ValueError(f"features.{index} is a BatchNorm without a convolution before it")
            scale = module.weight / torch.sqrt(module.running_var + module.eps)
            previous_conv.weight.mul_(scale.view(-1, 1, 1, 1))
            bias = previous_conv.bias if previous_conv.bias is not None else torch.zeros_like(scale)
            previous_conv.bias = nn.Parameter((bias - module.running_mean) * scale + module.bias)
            features[index] = nn.Identity()
            previous_conv = None
    return model


def layer_aliases(model: nn.Module) -> dict[str, str]:
    """VGG layer aliases -> torchvision module names.

    ``conv{block}_{i}`` for the i-th conv of each block (blocks end at a max-pool), ``fc6``,
    ``fc7``, ``fc8`` for the three linear layers. For VGG16: conv5_3 -> features.28,
    fc7 -> classifier.3.
    """
    aliases: dict[str, str] = {}
    block, index_in_block = 1, 0
    for index, module in enumerate(model.features):
        if isinstance(module, nn.Conv2d):
            index_in_block += 1
            aliases[f"conv{block}_{index_in_block}"] = f"features.{index}"
        elif isinstance(module, nn.MaxPool2d):
            block, index_in_block = block + 1, 0
    linears = [i for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear)]
    for number, index in enumerate(linears, start=6):
        aliases[f"fc{number}"] = f"classifier.{index}"
    return aliases


def resolve_layer(model: nn.Module, name: str) -> str:
    """Turn a layer name or alias (``conv5_3``, ``fc7``, ``features.28``) into the module name."""
    aliases = layer_aliases(model)
    if name in aliases:
        return aliases[name]
    if name in aliases.values():
        return name
    known = ", ".join(list(aliases) + list(aliases.values()))
    raise KeyError(f"unknown layer {name!r}; this model has: {known}")


def input_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the model expects its inputs normalised with (ImageNet's unless it says)."""
    return getattr(model, "lrpscale_mean", IMAGENET_MEAN), getattr(model, "lrpscale_std", IMAGENET_STD)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely (``weights_only=True``), with errors that say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    with path.open("rb") as file:
        head = file.read(4)
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol byte 0x80);
    # anything else is no torch file, and calling it pickled code would mislead
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise WeightsError(f"{path} is not a torch weights file ({path.stat().st_size} bytes in another format); "
                           "pass a state dict saved with torch.save(model.state_dict(), path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise WeightsError(
            f"refusing {path}: it holds more than tensors (pickled code is not loaded); "
            f"save a plain state dict with torch.save(model.state_dict(), path). Detail: {str(error).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, IndexError, ValueError, KeyError) as error:
        raise WeightsError(f"cannot read weights file {path}: it is corrupt or not a torch file ({error})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    return state


def _mismatch(state: dict[str, torch.Tensor], model: nn.Module, error: RuntimeError) -> str:
    """Why a state dict does not load into ``model``, in words: the architecture it was saved
    from where the conv layers tell, else torch's first complaint (its first line ends at a colon)."""
    def layout(keys) -> tuple[int, bool]:
        convs = sum(1 for k in keys if re.fullmatch(r"features\.\d+\.weight", k) and k.replace("weight", "running_mean") not in keys)
        return convs, any(k.endswith("running_mean") for k in keys)

    found, expected = layout(set(state)), layout(set(model.state_dict()))
    if found != expected:
        names = {(count, bn): f"{base}{'_bn' if bn else ''}" for base, count in VGG_CONVS.items() for bn in (False, True)}
        saved = names.get(found, f"a VGG with {found[0]} conv layers")
        return (f"it holds {found[0]} conv layers{' with BatchNorm' if found[1] else ''} ({saved}); this model has "
                f"{expected[0]}: pass --model {saved}" if found in names else f"it holds {saved}")
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    return lines[0] if lines else str(error)


def _vgg_shape_from_state(state: dict[str, torch.Tensor]) -> dict:
    """Infer num_classes, width divisor, hidden width and pool size from a VGG state dict."""
    linear_weights = sorted(
        (k for k in state if re.fullmatch(r"classifier\.\d+\.weight", k)), key=lambda k: int(k.split(".")[1])
    )
    conv_weights = [k for k in state if re.fullmatch(r"features\.\d+\.weight", k) and state[k].ndim == 4]
    if len(linear_weights) != 3 or not conv_weights:
        raise WeightsError("the state dict does not look like a torchvision VGG (features.N / classifier.N keys)")
    first_fc, second_fc, last_fc = (state[k] for k in linear_weights)
    last_conv = max(conv_weights, key=lambda k: int(k.split(".")[1]))
    channels = state[last_conv].shape[0]
    pooled = int(round((first_fc.shape[1] / channels) ** 0.5))
    return {
        "num_classes": last_fc.shape[0],
        "width_divisor": 512 // channels,
        "hidden": second_fc.shape[0],
        "pooled_size": pooled,
    }


def _imagenet_state(name: str) -> dict[str, torch.Tensor]:
    weights_enum = tv_vgg.__dict__[f"VGG{name[3:].replace('_bn', '_BN')}_Weights"].IMAGENET1K_V1
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # a firewall that drops packets must not hang the run
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch hub announces the download on stderr
            return weights_enum.get_state_dict(progress=False)
    except Exception as error:  # urllib raises many kinds; all mean the same to the user
        raise WeightsError(
            f"cannot download imagenet weights for {name} ({type(error).__name__}: {error}); "
            f"without network, pass --weights PATH to a torchvision {name} state dict"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def load_model(
    name: str = "vgg16",
    weights: str | Path | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> tv_vgg.VGG:
    """Return a VGG in eval mode with BatchNorm folded, ready for the LRP engine.

    ``weights``: None (random, seeded with ``seed``), ``"imagenet"`` (torchvision's weights),
    a path to a state dict (``.pth``/``.pt``; ``num_classes`` and the widths are inferred from it),
    or ``"demo"`` / ``"demo-<dataset>"`` for the bundled demo models. The returned model carries
    ``lrpscale_model_id`` (name and weights checksum), its input normalisation
    (``lrpscale_mean``/``lrpscale_std``), the image size it was made for and its class names
    (``lrpscale_classes``, None where the weights carry none).
    """
    weights_id = "random"
    mean_std = (IMAGENET_MEAN, IMAGENET_STD)
    image_size, classes = 224, None
    if weights is None:
        torch.manual_seed(seed)
        model = build_vgg(name, num_classes or 1000)
        weights_id = f"random-seed{seed}"
    elif str(weights) == "imagenet":
        if num_classes not in (None, 1000):
            raise WeightsError("imagenet weights have 1000 classes; drop num_classes or pass a weights file")
        model = build_vgg(name, 1000, init=False)
        model.load_state_dict(_imagenet_state(name))
        weights_id = f"imagenet-{name}"
        classes = list(tv_vgg.VGG16_Weights.IMAGENET1K_V1.meta["categories"])
    elif str(weights).startswith("demo"):
        spec = demo_spec(str(weights))
        path = ASSETS / spec.file
        actual = file_sha256(path) if path.is_file() else "missing"
        if actual != spec.sha256:
            raise WeightsError(f"bundled demo weights {path} are {actual}, expected sha256 {spec.sha256}: "
                               "reinstall lrpscale or re-run scripts/train_demo_models.py")
        model = build_vgg(name, spec.num_classes, spec.width_divisor, spec.hidden, pooled_size=1, init=False)
        model.load_state_dict(load_state_dict(path))
        weights_id = spec.sha256
        mean_std = (spec.mean, spec.std)
        image_size, classes = spec.image_size, list(spec.classes)
    else:
        state = load_state_dict(weights)
        shape = _vgg_shape_from_state(state)
        if num_classes is not None and num_classes != shape["num_classes"]:
            raise WeightsError(f"{weights} has {shape['num_classes']} classes, not num_classes={num_classes}")
        model = build_vgg(name, **shape, init=False)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise WeightsError(f"{weights} does not fit {name}: {_mismatch(state, model, error)}") from None
        weights_id = file_sha256(weights)
    model.eval()
    fold_batchnorm(model)
    model.lrpscale_model_id = f"{name}:{weights_id}"
    model.lrpscale_mean, model.lrpscale_std = mean_std
    model.lrpscale_image_size, model.lrpscale_classes = image_size, classes
    return model
