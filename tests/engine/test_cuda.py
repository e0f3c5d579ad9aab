"""CUDA against CPU and against zennit, where a CUDA GPU is available (skipped elsewhere)."""
from __future__ import annotations

import os

# before anything starts CUDA: cuDNN reads it when it loads (see lrpscale.analyze.use_tf32)
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")

import numpy as np
import pytest
import torch

import lrpscale
from lrpscale.config import AnalysisConfig
from lrpscale.engine.models import build_vgg
from tests.helpers.oracles import normalized, relative_max_diff, zennit_lrp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_close_across_devices(a: torch.Tensor, b: torch.Tensor) -> None:
    """Heatmaps from two devices in FP32, each normalised by its sum of |values|.

    cuDNN sums in other orders than the CPU; over 16 layers that moves pixels where positive and
    negative contributions cancel. Measured on an H100 (VGG16, 224x224): lrpscale CUDA vs CPU,
    relative L2 error 2.6e-5 (epsilon-gamma-box) and 1.9e-3 (alpha-beta, whose 2x positive minus
    1x negative parts amplify rounding); zennit's own CUDA vs CPU 2.0e-3 for epsilon-gamma-box.
    A wrong rule or mask moves the heatmap by O(1).
    """
    a, b = normalized(a.cpu()), normalized(b.cpu())
    assert float((a - b).norm() / b.norm()) < 5e-3
    assert relative_max_diff(a, b) < 2e-2


@pytest.mark.parametrize("composite", list(lrpscale.COMPOSITES))
def test_cuda_heatmap_equals_cpu_and_zennit(composite):
    torch.manual_seed(0)
    model = build_vgg("vgg16").eval()
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    cpu_explainer = lrpscale.Explainer(model, composite)
    cpu = cpu_explainer.explain(x, keep_layers=False)
    # the oracle runs on the CPU: zennit's own CUDA kernels sum in yet another order
    theirs, _ = zennit_lrp(model, x, cpu.target, composite, cpu_explainer.low, cpu_explainer.high)
    cuda = lrpscale.Explainer(model.cuda(), composite).explain(x.cuda(), keep_layers=False)
    assert torch.equal(cuda.target.cpu(), cpu.target)
    assert_close_across_devices(cuda.relevance, cpu.relevance)
    assert_close_across_devices(cuda.relevance, theirs)


def test_cuda_batch_invariance():
    torch.manual_seed(0)
    model = build_vgg("vgg16").eval().cuda()
    x = torch.randn(5, 3, 224, 224, device="cuda")
    explainer = lrpscale.Explainer(model)
    together = explainer.explain(x, keep_layers=False).relevance
    alone = explainer.explain(x[3:4], keep_layers=False).relevance
    assert_close_across_devices(alone, together[3:4])


def test_analyzer_actor_on_cuda_agrees_with_cpu(tmp_path):
    from lrpscale.run.actor import AnalyzerActor

    torch.manual_seed(0)
    torch.save(build_vgg("vgg16").state_dict(), tmp_path / "vgg16.pth")
    rng = np.random.default_rng(0)
    count = 8
    batch = {"image_id": np.array([f"img{i}" for i in range(count)], dtype=object),
             "uri": np.array([f"mem://{i}" for i in range(count)], dtype=object),
             "label": np.array([None] * count, dtype=object), "ok": np.ones(count, bool),
             "pixels": rng.standard_normal((count, 3, 224, 224)).astype(np.float32),
             "shard": np.zeros(count, np.int32), "error_stage": np.array([None] * count, dtype=object),
             "error_type": np.array([None] * count, dtype=object),
             "error_message": np.array([None] * count, dtype=object)}
    config = AnalysisConfig().to_dict()
    on_cuda = AnalyzerActor("vgg16", str(tmp_path / "vgg16.pth"), config, device="cuda")(batch).to_pylist()
    on_cpu = AnalyzerActor("vgg16", str(tmp_path / "vgg16.pth"), config, device="cpu")(batch).to_pylist()
    for a, b in zip(on_cuda, on_cpu):
        assert a["pred"] == b["pred"] and a["error_stage"] is None
        ha, hb = np.asarray(a["heatmap"], np.float32), np.asarray(b["heatmap"], np.float32)
        assert np.abs(ha - hb).max() < 2e-3  # float16-stored, scaled to max 1
        chosen_a = {(s["layer"], s["variant"]): s["k"] for s in a["scores"] if s["chosen"]}
        chosen_b = {(s["layer"], s["variant"]): s["k"] for s in b["scores"] if s["chosen"]}
        assert chosen_a == chosen_b
        # the head of every ranking agrees; deep in a 64-neuron selection, near-equal relevances
        # may swap places between devices
        for layer in {n["layer"] for n in b["neurons"]}:
            ranked_a = [n["neuron"] for n in a["neurons"] if n["layer"] == layer]
            ranked_b = [n["neuron"] for n in b["neurons"] if n["layer"] == layer]
            assert ranked_a[:4] == ranked_b[:4]
            assert len(set(ranked_a) & set(ranked_b)) >= 0.9 * len(ranked_b)
