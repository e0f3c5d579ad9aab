"""The unit of distributed work: a model replica that analyses decoded inputs. ``__call__`` turns
one batch into result rows; ``analyse_shard`` turns a whole shard into its table files, written
straight to the run's filesystem under a name unique to the attempt, and returns only a small
summary for the driver to commit. A plain class, so it runs and is tested without Ray (also
where Ray is not installed, as on a bare GPU machine)."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from lrpscale.config import AnalysisConfig
from lrpscale.engine.analyzer import Analyzer, use_tf32
from lrpscale.engine.models import input_normalization, load_model
from lrpscale.inputs.errors import ERROR_FIELDS
from lrpscale.locations import fetched
from lrpscale.run.sampling import image_seed, in_sample
from lrpscale.storage import tables
from lrpscale.storage.store import RunStore


def label_indices(labels, classes: list[str] | None, num_classes: int) -> list[int | None]:
    """Map label strings to class indices: by the class names where known, else integer labels."""
    lookup = {name: i for i, name in enumerate(classes or [])}
    out = []
    for label in labels:
        if label is None:
            out.append(None)
        elif label in lookup:
            out.append(lookup[label])
        elif str(label).isdigit() and int(label) < num_classes:
            out.append(int(label))
        else:
            out.append(None)
    return out


class AnalyzerActor:
    """A model replica: ``__init__`` loads the model once, ``__call__`` analyses one batch.

    Takes a ``decoding.decode_batch`` output (numpy columns; uint8 ``pixels`` are normalised here,
    on the actor's device, float32 ones are taken as already normalised, as ``load_batch`` gives
    them) and returns a ``tables.RESULT`` table with one row per input, each naming the Ray node
    that analysed it. A batch that fails in the model
    is retried image by image, so one bad input becomes an ``analyze`` error row instead of
    taking its batch down. The images of the seeded faithfulness sample (``in_sample`` of the
    image_id, share ``faithfulness_sample``) also get their region perturbation curves.
    """

    def __init__(self, model: str, weights: str | None, analysis: dict, device: str | None = None,
                 tf32: bool = False, output: str | None = None, run_id: str | None = None,
                 image_size: int | None = None, batch_size: int = 16):
        """output, run_id, image_size: the run that ``analyse_shard`` writes into (not needed to
        call the actor on a batch); batch_size: images per model call within a shard."""
        # the actor owns its process: TF32 convolutions select slightly different neurons than the
        # CPU does, so full FP32 is the default and TF32 an opt-in for speed; set before CUDA starts
        use_tf32(tf32)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net = load_model(model, fetched(weights)).to(self.device)
        self.analyzer = Analyzer(net, AnalysisConfig.from_mapping(analysis))
        self.classes = net.lrpscale_classes
        self.num_classes = net.classifier[-1].out_features
        self.config = self.analyzer.config
        self.node_id = _node_id()
        mean, std = input_normalization(net)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).reshape(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).reshape(1, 3, 1, 1)
        self.model_id = net.lrpscale_model_id
        self.store = RunStore(output) if output is not None else None
        self.run_id = run_id
        self.image_size = image_size or net.lrpscale_image_size
        self.batch_size = batch_size

    def analyse_shard(self, shard: int, batch: dict[str, np.ndarray], attempt: str) -> dict:
        """Analyse a whole shard (a ``decode_batch`` output) ``batch_size`` images at a time, split
        the rows into the run's tables and write them as this attempt's files.

        Returns the summary the driver commits: shard, attempt, rows, errors, files ({table: file
        relative to the run}), node, seconds. The rows themselves never travel to the driver."""
        started = time.perf_counter()
        count = len(batch["image_id"])
        step = self.batch_size
        parts = [self({name: column[i:i + step] for name, column in batch.items()}) for i in range(0, count, step)]
        result = pa.concat_tables(parts) if parts else tables.RESULT.empty_table()
        config = self.config
        split = tables.split_result(result, min(config.heatmap_size, self.image_size), min(config.deconv_size, self.image_size),
                                    config.deconv_mode, self.model_id, self.run_id, config.composite)
        files = self.store.write_shard(shard, attempt, split)
        return {"shard": shard, "attempt": attempt, "rows": result.num_rows, "errors": split["errors"].num_rows,
                "files": files, "node": self.node_id, "seconds": time.perf_counter() - started}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        count = len(batch["image_id"])
        rows: list[dict] = [self._base_row(batch, i) for i in range(count)]
        good = [i for i in range(count) if bool(batch["ok"][i])]
        if good:
            for i, record in zip(good, self._analyse(batch, good)):
                rows[i].update(record)
        return pa.Table.from_pylist(rows, schema=tables.RESULT)

    def conditional_heatmaps(self, batch: dict[str, np.ndarray], requests: list[tuple[int, str, int]],
                             crop: Callable | None = None) -> list:
        """Channel-conditional heatmaps (docs/method.md §6) of decoded images, on this replica.

        batch: a ``decode_batch`` output, with an optional int ``target`` column (the class each
        row is explained for; the prediction without one). requests: (row of batch, layer,
        neuron). Per request, in order: the input relevance when only that neuron's relevance
        goes down from its layer, ``explain(x, restrict={layer: [neuron]})`` summed over colour,
        (S, S) float32; or ``crop(pixels, heatmap)`` of it (the row's (3, S, S) pixels as the batch
        holds them, uint8 when decoded), made here so that only what it returns travels; None for
        a row that did not decode. One forward pass per group of rows and layer; a row's neurons
        are conditions of that pass, at most ``batch_size`` images x conditions at a time (fewer
        on a CPU: ``Explainer.cpu_chunk``)."""
        explainer = self.analyzer.explainer
        out: list = [None] * len(requests)
        wanted: dict[str, dict[int, list[tuple[int, int]]]] = {}
        for position, (row, layer, neuron) in enumerate(requests):
            if bool(batch["ok"][row]):
                wanted.setdefault(layer, {}).setdefault(int(row), []).append((position, int(neuron)))
        targets = batch.get("target")
        for layer, by_row in wanted.items():
            rows = sorted(by_row, key=lambda r: (-len(by_row[r]), r))  # similar condition counts share a pass
            start = 0
            while start < len(rows):
                conditions = len(by_row[rows[start]])
                pixels = self._pixels(batch, rows[start:start + 1])
                budget = self.batch_size if self.device.type != "cpu" else min(self.batch_size, explainer.cpu_chunk(pixels))
                chunk = rows[start:start + max(1, budget // conditions)]
                start += len(chunk)
                target = None if targets is None else torch.tensor([int(targets[r]) for r in chunk])
                restrict = [{layer: [[by_row[r][j][1]] if j < len(by_row[r]) else [] for r in chunk]}
                            for j in range(conditions)]
                relevance = explainer.explain(self._pixels(batch, chunk), target, restrict, keep_layers=False).relevance
                maps = relevance.sum(2).float().cpu().numpy()  # (rows, conditions, S, S)
                for i, r in enumerate(chunk):
                    for j, (position, _) in enumerate(by_row[r]):
                        out[position] = maps[i, j] if crop is None else crop(batch["pixels"][r], maps[i, j])
        return out

    def _pixels(self, batch, rows: list[int]) -> torch.Tensor:
        """(N, 3, S, S) model input of the given rows: uint8 pixels (as decoded: a quarter of the bytes
        crossed the object store) normalised here, float32 ones taken as already normalised."""
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][rows])).to(self.device)
        return (pixels.float() / 255.0 - self.mean) / self.std if pixels.dtype == torch.uint8 else pixels

    def _base_row(self, batch, i: int) -> dict:
        label = _text(batch["label"][i])
        return {"image_id": str(batch["image_id"][i]), "uri": str(batch["uri"][i]), "label": label,
                "label_index": label_indices([label], self.classes, self.num_classes)[0],
                "shard": int(batch["shard"][i]), "node_id": self.node_id,
                **{name: _text(batch[name][i]) for name in ERROR_FIELDS}}

    def _analyse(self, batch, indices: list[int]) -> list[dict]:
        pixels = self._pixels(batch, indices)
        labels = label_indices([_text(batch["label"][i]) for i in indices], self.classes, self.num_classes)
        perturb = self._perturbation_seeds([str(batch["image_id"][i]) for i in indices])
        try:
            return self._records(pixels, labels, perturb)
        except Exception:
            if len(indices) == 1:
                raise
        out = []
        for position, i in enumerate(indices):
            try:
                if self.config.target == "label" and labels[position] is None:
                    raise ValueError(f"label {_text(batch['label'][i])!r} is not one of the model's classes "
                                     "(target is the label)")
                out.extend(self._records(pixels[position:position + 1], labels[position:position + 1],
                                         perturb[position:position + 1]))
            except Exception as error:  # the image, not the run, fails
                out.append({"error_stage": "analyze", "error_type": type(error).__name__,
                            "error_message": str(error)[:2000]})
        return out

    def _perturbation_seeds(self, image_ids: list[str]) -> torch.Tensor:
        """(N,) int64: each sampled image's seed of its random patch order, -1 for the others."""
        seed, share = self.config.faithfulness_seed, self.config.faithfulness_sample
        return torch.tensor([image_seed(seed, image_id) if share and in_sample(seed, image_id, share) else -1
                             for image_id in image_ids], dtype=torch.int64)

    def _records(self, pixels: torch.Tensor, labels: list[int | None], perturb: torch.Tensor) -> list[dict]:
        if self.config.target == "label" and any(label is None for label in labels):
            raise ValueError("target='label' but the label is missing or not one of the model's classes")
        label_tensor = torch.tensor([-1 if l is None else l for l in labels], device=self.device)
        analysis = self.analyzer(pixels, label_tensor if self.config.target == "label" else None, perturb)
        return [tables.result_row(record, self.classes[record["pred"]] if self.classes else str(record["pred"]))
                for record in analysis.records()]


def _node_id() -> str | None:
    """The Ray node this process runs on; None outside Ray (the actor class used alone, also
    where Ray is not installed, as on a bare GPU machine)."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _text(value) -> str | None:
    """A string cell from a Ray batch: Ray turns a column that is all None into floats (NaN)."""
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return None
    return str(value)

