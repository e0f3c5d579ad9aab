"""The LRP engine against zennit, and the invariants LRP must keep (docs/method.md §3-§6)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

import lrpscale
from lrpscale.engine.models import WeightsError, build_vgg, load_model
from tests.helpers.models import randomize_batchnorm
from tests.helpers.oracles import normalized, relative_max_diff, zennit_lrp

COMPOSITES = list(lrpscale.COMPOSITES)


def _images(seed: int, n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _raw_model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_vgg(name).eval()
    return randomize_batchnorm(model) if name.endswith("_bn") else model


def _zennit_cases():
    """Each composite on VGG16 and the BatchNorm-folded VGG11 with the default composite in
    ``make test-fast``; the other composites, sizes and seeds in the full suite."""
    for name, seed, size in (("vgg16", 0, 64), ("vgg11_bn", 2, 64), ("vgg16", 1, 96), ("vgg11_bn", 3, 80)):
        for composite in COMPOSITES:
            fast = (name, seed) == ("vgg16", 0) or (seed == 2 and composite == "epsilon-gamma-box")
            yield pytest.param(composite, name, seed, size, marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("composite,name,seed,size", _zennit_cases())
def test_heatmap_and_layers_equal_zennit(composite, name, seed, size):
    model = _raw_model(name, seed)
    x = _images(seed, size=size)
    explainer = lrpscale.Explainer(model, composite)
    ours = explainer.explain(x)
    theirs, theirs_layers = zennit_lrp(model, x, ours.target, composite, explainer.low, explainer.high,
                                       canonize=name.endswith("_bn"))
    assert relative_max_diff(normalized(ours.relevance), normalized(theirs)) < 1e-5
    assert set(ours.layers) == set(theirs_layers) == set(explainer.layer_names)
    for layer, relevance in ours.layers.items():
        assert relative_max_diff(normalized(relevance), normalized(theirs_layers[layer])) < 1e-5, layer


@pytest.mark.slow  # full-size VGG weights: seconds to build and save
def test_full_size_vgg16_equals_zennit(vgg16):
    x = _images(7, n=1, size=224)
    explainer = lrpscale.Explainer(vgg16)
    ours = explainer.explain(x, keep_layers=False)
    theirs, _ = zennit_lrp(vgg16, x, ours.target, "epsilon-gamma-box", explainer.low, explainer.high)
    assert relative_max_diff(normalized(ours.relevance), normalized(theirs)) < 1e-5


def test_explicit_targets_and_initial_relevance(vgg16):
    x = _images(3, n=3)
    explainer = lrpscale.Explainer(vgg16)
    result = explainer.explain(x, target=[5, 7, 9])
    assert result.target.tolist() == [5, 7, 9]
    assert torch.equal(result.initial, result.logits[torch.arange(3), result.target])
    # the relevance entering the last layer is the target logit, nothing else
    last = result.layers["classifier.6"]
    assert torch.equal(last[torch.arange(3), result.target], result.initial)
    assert int((last != 0).sum()) == 3
    with pytest.raises(ValueError, match="out of range"):
        explainer.explain(x, target=1000)


@pytest.mark.parametrize("composite", [pytest.param(c, marks=pytest.mark.slow) if c.endswith("-flat") else c
                                       for c in COMPOSITES])  # the -flat variants in the full suite only
def test_conservation_without_biases(composite):
    model = _raw_model("vgg16", 4)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.bias.zero_()
    result = lrpscale.Explainer(model, composite).explain(_images(4, size=64))
    errors = result.conservation_errors()
    assert set(errors) == set(result.layers) | {"input"}
    for layer, error in errors.items():
        assert float(error.max()) < 1e-4, (layer, error)


def test_conservation_report_with_biases(vgg16):
    result = lrpscale.Explainer(vgg16).explain(_images(5))
    error = result.conservation_error
    recomputed = (result.relevance.flatten(1).sum(1) - result.initial).abs() / result.initial.abs()
    assert torch.allclose(error, recomputed, rtol=1e-4)
    assert torch.allclose(result.totals["features.0"], result.layers["features.0"].flatten(1).sum(1))


def test_batch_invariance(vgg16):
    batch = _images(6, n=5)
    explainer = lrpscale.Explainer(vgg16)
    together = explainer.explain(batch)
    alone = explainer.explain(batch[2:3])
    assert torch.allclose(alone.relevance[0], together.relevance[2], rtol=1e-4, atol=1e-6 * float(
        together.relevance[2].abs().max()))


def test_determinism(vgg16):
    x = _images(8)
    explainer = lrpscale.Explainer(vgg16)
    assert torch.equal(explainer.explain(x).relevance, explainer.explain(x).relevance)


@pytest.mark.slow  # full-size VGG weights: seconds to build and save
def test_two_explainers_coexist(weights_file):
    model_a = load_model("vgg16", weights_file("vgg16", seed=0))
    model_b = load_model("vgg11", weights_file("vgg11", seed=1))
    x = _images(9)
    alone_a = lrpscale.Explainer(model_a).explain(x).relevance
    a, b = lrpscale.Explainer(model_a, "epsilon-plus-flat"), lrpscale.Explainer(model_b)
    a_default = lrpscale.Explainer(model_a)
    b.explain(x)
    assert torch.equal(a_default.explain(x).relevance, alone_a)
    assert not torch.equal(a.explain(x).relevance, alone_a)


@pytest.mark.slow  # full-size VGG weights: seconds to build and save
def test_batchnorm_folding_keeps_logits(weights_file):
    raw = build_vgg("vgg11_bn").eval()
    raw.load_state_dict(torch.load(weights_file("vgg11_bn"), weights_only=True))
    folded = load_model("vgg11_bn", weights_file("vgg11_bn"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = _images(10)
    with torch.no_grad():
        assert torch.allclose(raw(x), folded(x), rtol=1e-4, atol=1e-5)
    assert lrpscale.Explainer(raw).explain(x).logits.allclose(folded(x), rtol=1e-4, atol=1e-5)


def test_layer_aliases(vgg16):
    explainer = lrpscale.Explainer(vgg16)
    assert explainer.resolve("conv5_3") == "features.28"
    assert explainer.resolve("conv1_1") == "features.0"
    assert explainer.resolve("fc7") == "classifier.3"
    assert explainer.resolve("fc8") == "classifier.6"
    with pytest.raises(KeyError, match="unknown layer"):
        explainer.resolve("conv6_1")


@pytest.mark.slow  # full-size VGG weights: seconds to build and save
def test_weights_from_file_infer_num_classes(weights_file):
    model = load_model("vgg16", weights_file("vgg16", seed=3, num_classes=10))
    assert model.classifier[6].out_features == 10
    with pytest.raises(WeightsError, match="10 classes"):
        load_model("vgg16", weights_file("vgg16", seed=3, num_classes=10), num_classes=1000)


def test_corrupt_weights_are_refused(tmp_path, weights_file):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(weights_file("vgg16").read_bytes()[:5000])
    with pytest.raises(WeightsError, match="corrupt"):
        load_model("vgg16", corrupt)
    with pytest.raises(WeightsError, match="does not exist"):
        load_model("vgg16", tmp_path / "missing.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(1), "payload": _Payload()}, evil)
    with pytest.raises(WeightsError, match="pickled code is not loaded"):
        load_model("vgg16", evil)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(WeightsError):
        load_model("vgg16", plain)


@pytest.mark.slow  # full-size VGG weights: seconds to build and save
def test_wrong_architecture_is_refused(weights_file):
    with pytest.raises(WeightsError, match="does not fit"):
        load_model("vgg16", weights_file("vgg11"))


def test_imagenet_without_network_fails_fast(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    import torchvision.models._api as weights_api

    monkeypatch.setattr(weights_api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match="pass --weights PATH"):
        load_model("vgg16", "imagenet")


def test_explainer_does_not_modify_model():
    model = _raw_model("vgg11_bn", 5)
    before = copy.deepcopy(model.state_dict())
    lrpscale.Explainer(model).explain(_images(11))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("composite", list(lrpscale.COMPOSITES))
def test_propagate_leaves_callers_relevance_and_kept_layers_intact(composite):
    """Rules divide relevance in place only where propagate owns it: never the caller's tensor,
    never a layer's relevance it returns as kept."""
    torch.manual_seed(0)
    model = build_vgg("vgg11", 10, width_divisor=16, hidden=32, pooled_size=1).eval()
    explainer = lrpscale.Explainer(model, composite)
    record = explainer.forward(torch.randn(3, 3, 32, 32))
    convs = [name for name in explainer.layer_names if name.startswith("features.")]
    start, kept_layer = convs[-2], convs[-4]
    seed = torch.rand(3, 2, *record.activations[start].shape[1:])
    before = seed.clone()
    _, kept, _ = explainer.propagate(record, seed, start=start, keep=[kept_layer])
    assert torch.equal(seed, before)
    # the same relevance again, propagated down to the kept layer's output and no further
    expected, _, _ = explainer.propagate(record, before.clone(), start=start, stop=kept_layer)
    assert torch.equal(kept[kept_layer], expected)


def test_cpu_chunks_give_the_same_explanation(monkeypatch):
    """explain() on a CPU runs a large batch in chunks; every field equals one pass over it."""
    from lrpscale.engine import explainer as module

    torch.manual_seed(0)
    model = build_vgg("vgg11", 10, width_divisor=16, hidden=32, pooled_size=1).eval()
    explainer = lrpscale.Explainer(model)
    x, targets = torch.randn(5, 3, 32, 32), [3, 1, 4, 1, 5]
    whole = explainer.explain(x, target=targets)
    per_image = module.CPU_CHUNK_BYTES // explainer.cpu_chunk(x)
    monkeypatch.setattr(module, "CPU_CHUNK_BYTES", 2 * per_image)  # chunks of 2, 2 and 1 images
    assert explainer.cpu_chunk(x) == 2
    chunked = explainer.explain(x, target=targets)
    assert torch.equal(chunked.target, torch.tensor(targets))
    # conv algorithms sum in batch-size-dependent orders: equal to float32 rounding, per tensor
    for name in ("relevance", "logits", "initial"):
        assert relative_max_diff(getattr(chunked, name), getattr(whole, name)) < 1e-5, name
    for name in ("layers", "activations", "totals"):
        mine, theirs = getattr(chunked, name), getattr(whole, name)
        assert mine.keys() == theirs.keys()
        for key in theirs:
            assert relative_max_diff(mine[key], theirs[key]) < 1e-5, (name, key)
