"""CUDA against CPU and against zennit, where a CUDA GPU is available (skipped elsewhere)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lrpscale
from lrpscale.analyze import AnalysisConfig
from lrpscale.models import build_vgg
from oracles import normalized, relative_max_diff, zennit_lrp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def full_fp32():
    """TF32 would make CUDA differ from the CPU by more than rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("composite", list(lrpscale.COMPOSITES))
def test_cuda_heatmap_equals_zennit_and_cpu(composite):
    torch.manual_seed(0)
    model = build_vgg("vgg16").eval()
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    cpu = lrpscale.Explainer(model, composite).explain(x, keep_layers=False)
    cuda_explainer = lrpscale.Explainer(model.cuda(), composite)
    cuda = cuda_explainer.explain(x.cuda(), keep_layers=False)
    assert torch.equal(cuda.target.cpu(), cpu.target)
    assert relative_max_diff(normalized(cuda.relevance.cpu()), normalized(cpu.relevance)) < 1e-5
    theirs, _ = zennit_lrp(model, x.cuda(), cuda.target, composite, cuda_explainer.low.cuda(),
                           cuda_explainer.high.cuda())
    assert relative_max_diff(normalized(cuda.relevance), normalized(theirs)) < 1e-5


def test_cuda_batch_invariance():
    torch.manual_seed(0)
    model = build_vgg("vgg16").eval().cuda()
    x = torch.randn(5, 3, 224, 224, device="cuda")
    explainer = lrpscale.Explainer(model)
    together = explainer.explain(x, keep_layers=False).relevance
    alone = explainer.explain(x[3:4], keep_layers=False).relevance
    assert relative_max_diff(normalized(alone), normalized(together[3:4])) < 1e-5


def test_analyzer_actor_on_cuda_agrees_with_cpu(tmp_path):
    from lrpscale.pipeline import AnalyzerActor

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
        assert [(n["layer"], n["neuron"]) for n in a["neurons"]] == [(n["layer"], n["neuron"]) for n in b["neurons"]]
