"""The HTML report of a run: one self-contained page (pictures inline as PNG data URIs, CSS inline,
no scripts, nothing fetched) with the classes' prediction strategies (SpRAy), the run summary, a
class gallery, the worst-explained images, the errors and, when asked, the comparison with another run.

    write_report("runs/audit")                        # runs/audit/report.html
    write_report("runs/new", compare="runs/old")      # with the comparison old (A) -> new (B)

Pictures come from ``lrpscale.report.figures``; the class gallery reads the reducer's tables (running the
reducer first when ``RUN/classes`` is missing). Big tables are cut to ``rows`` rows and said so,
and the gallery shows at most ``gallery`` classes, so a run of 1,000 classes gives a page of the
same size as one of ten.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from lrpscale import __version__
from lrpscale.locations import resolve
from lrpscale.report.figures import layer_order
from lrpscale.results import Run
from lrpscale.results.class_counts import class_order
from lrpscale.results.comparison import compare_runs, percent
from lrpscale.results.reducer import reduce_run
from lrpscale.results.run import STRATEGY_FILES
from lrpscale.storage.store import CLASSES, REPORT, RunStore
from lrpscale.storage.tables import square_picture

GALLERY_CLASSES = 20  # classes pictured in the gallery unless told otherwise
ROWS = 20  # rows of each table before it is cut
CHANGED_IMAGES = 12  # image pairs shown side by side in the comparison
HEATMAP_PIXELS = 128  # displayed side of a heatmap thumbnail (the PNG holds the stored resolution)
INPUT_PIXELS = 128  # largest side of an input thumbnail's PNG
MAX_INPUT_BYTES = 32 * 1024 ** 2  # larger input files get no thumbnail
FIGURE_DPI = 100
STRATEGY_MEMBERS = 4  # member thumbnails per cluster in the Strategies section
REFERENCE_TILES = 4  # reference crops per distinguishing neuron and scope (class, run) there
REFERENCE_PIXELS = 40  # their displayed height
MEMBER_PIXELS = 64  # their displayed side, and the largest side of their input's PNG


def write_report(run: str | Path | Run, compare: str | Path | Run | None = None, output: str | Path | None = None,
                 gallery: int = GALLERY_CLASSES, classes: Sequence[str] | None = None, rows: int = ROWS) -> Path:
    """Write ``report.html`` into ``output`` (default: the run directory); returns its path.

    compare: an earlier run (A) to compare this one (B) with. gallery: how many classes the
    gallery pictures (by default the ones with the lowest accuracy when there are more);
    classes: exactly these classes (labels) instead. rows: rows of the longer tables.
    """
    run = run if isinstance(run, Run) else Run(run)
    page = render_report(run, compare, gallery, classes, rows)
    folder = run.store if output is None else RunStore(output)
    folder.write_bytes(REPORT, page.encode("utf-8"))  # written whole: a reader never sees half a page
    return folder.local_path() / REPORT if folder.local_path() else folder.path(REPORT)


def render_report(run: Run, compare: str | Path | Run | None = None, gallery: int = GALLERY_CLASSES,
                  classes: Sequence[str] | None = None, rows: int = ROWS) -> str:
    """The report as one HTML string; arguments as in ``write_report``."""
    if not run.is_reduced:
        reduce_run(run.store)
    labels = run.layer_labels
    sections = [("strategies", "Strategies", _strategies_section(run, labels, gallery, rows)),
                ("summary", "Run summary", _summary_section(run, rows)),
                ("classes", "Class gallery", _gallery_section(run, labels, gallery, classes)),
                ("trust", "Can the heatmaps be trusted?", _trust_section(run, rows)),
                ("worst", "Worst-explained images", _worst_section(run, labels, rows)),
                ("errors", "Errors", _errors_section(run, rows))]
    if compare is not None:
        before = compare if isinstance(compare, Run) else Run(compare)
        comparison = compare_runs(before, run)
        sections.append(("comparison", "Comparison", _comparison_section(comparison, before, run, rows)))
    title = f"lrpscale report: run {run.info.get('run_id', run.store.location)}"
    notes = [note for note in (run.incomplete_note(),) if note]
    if compare is not None:
        notes += comparison.summary.get("warnings", [])
    warnings = "".join(f'<p class="warning" role="alert">{html.escape(note)}</p>\n' for note in notes)
    nav = " ".join(f'<a href="#{key}">{html.escape(name)}</a>' for key, name, _ in sections)
    body = "\n".join(f'<section id="{key}">\n<h2>{html.escape(name)}</h2>\n{content}\n</section>'
                     for key, name, content in sections)
    generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<header><h1>{html.escape(title)}</h1><nav>{nav}</nav></header>\n<main>\n{warnings}{body}\n</main>\n"
            f"<footer>lrpscale {__version__}, {html.escape(generated)}; {html.escape(str(run.path))}</footer>\n"
            "</body>\n</html>\n")


# --- sections ------------------------------------------------------------------------------------

def _strategies_section(run: Run, labels: dict[str, str], count: int, rows: int) -> str:
    """SpRAy per class by label (docs/method.md §18): the classes in rank order (lowest
    connectivity first) as a table of ``rows`` rows, then a card for each of the first ``count``:
    its eigenvalues and t-SNE layout, and per cluster the prototype, size, accuracy, the members
    closest to the prototype and the distinguishing neurons."""
    from lrpscale.report import strategy_figures

    if not run.has_strategies:
        return ("<p class=note>No strategies for this run yet: <code>lrpscale strategies RUN</code> (also run by "
                "<code>lrpscale reduce RUN</code>) clusters each class's heatmaps (SpRAy) and ranks the classes by "
                "how clearly their images fall into groups explained in different ways.</p>")
    classes = run.strategy_classes
    classes = classes[classes["grouping"] == "label"].sort_values("rank", ignore_index=True)
    if classes.empty:
        return "<p class=note>The run has no labelled images: its strategies are by prediction only (see the tables).</p>"
    first = classes.iloc[0]
    features = {"heatmap": "heatmaps sum-pooled to at most 32x32", "channels": "relevance per channel of the swept layer"}
    intro = (f"SpRAy: each class's images are compared by their {features.get(first['features'], first['features'])} "
             f"(each divided by its sum of |relevance|); a {int(first['k'])}-nearest-neighbour graph, its Laplacian's "
             "eigenvalues and the largest gap among the first ten give the number of clusters, one per prediction "
             "strategy. Connectivity is the second-smallest eigenvalue: near 0, part of the class is explained unlike "
             "the rest (a watermark, a background, a border) and worth a look. Classes by true label, lowest "
             f"connectivity first (seed {int(first['seed'])}; classes above {int(first['cap'])} images clustered on "
             "a sample). In each card: the eigenvalues, the red arrow at the gap that set the number of clusters "
             "(looked for up to the dotted line); the t-SNE layout of the class's images, one colour per cluster; per "
             "cluster, framed in its colour, the prototype (the mean of its normalised heatmaps), the members closest "
             "to it (input and heatmap) and the neurons selected far more or less often in it than in the rest of the class, "
             "each with its reference images in the class and in the run: the images where the neuron holds the most "
             "relevance, cropped to where its conditional heatmap (only its relevance sent down) lies, the heatmap over "
             "the crop.")
    shares = run.store.read_parquet(f"{CLASSES}/{STRATEGY_FILES['strategy_clusters']}", columns=["class", "share"],
                                    filters=[("grouping", "==", "label")]).to_pandas().groupby("class")["share"].max()
    table = classes.head(rows).assign(largest=[float(shares.get(cls, np.nan)) for cls in classes["class"].head(rows)])
    table = table[["rank", "class_name", "images", "clusters", "connectivity", "eigengap", "largest"]].rename(
        columns={"class_name": "class", "clusters": "strategies", "largest": "largest cluster"})
    cut = (f"The first {rows} of {len(classes)} classes; " if len(classes) > rows else "")
    several = int((classes["clusters"] > 1).sum())
    note = (f"{cut}{several} of {len(classes)} classes split into more than one cluster (the eigengap rule offers at "
            f"least two for a class of more than {int(first['k']) + 1} images: the connectivity says how clearly they "
            "separate).")
    shown = classes.head(count)
    cards = [_strategy_card(run, labels, row, strategy_figures)
             for row in shown.rename(columns={"class": "cls"}).itertuples()]
    more = (f"<p class=note>Cards for the first {len(shown)} of {len(classes)} classes (more with --gallery).</p>"
            if len(classes) > len(shown) else "")
    return (f"<p class=note>{html.escape(intro)}</p><p class=note>{html.escape(note)}</p>"
            + _table(table, {"largest cluster": percent}) + more + "\n".join(cards))


def _strategy_card(run: Run, labels: dict[str, str], row, strategy_figures) -> str:
    """One class of the Strategies section (``row``: its strategy_classes row, ``class`` as ``cls``)."""
    cls = row.cls
    where = [("grouping", "==", "label"), ("class", "==", cls)]
    members = run.store.read_parquet(f"{CLASSES}/{STRATEGY_FILES['strategies']}", filters=where).to_pandas()
    clusters = run.store.read_parquet(f"{CLASSES}/{STRATEGY_FILES['strategy_clusters']}", filters=where).to_pandas()
    figure = strategy_figures.class_strategies_figure(
        row.eigenvalues, int(row.clusters), row.eigengap, members["x"], members["y"], members["cluster"],
        int(row.max_clusters), title=f"class {row.class_name}: {int(row.images)} images, connectivity {row.connectivity:.3g}")
    images = run.table("images", ["image_id", "uri", "label", "pred_label", "heatmap"],
                       (ds.field("label") == cls) & ds.field("image_id").isin(members["image_id"].tolist()))
    images = images.merge(members[["image_id", "cluster"]], on="image_id").sort_values("image_id", ignore_index=True)
    side = int(run.info.get("config", {}).get("image_size") or INPUT_PIXELS)
    parts, pictured = [], set()
    for cluster in clusters.sort_values("cluster").itertuples():
        prototype = square_picture(cluster.prototype)
        mine = images[images["cluster"] == cluster.cluster]
        tiles = []
        for member in _closest(mine, prototype).itertuples():
            picture = _input_picture(member.uri, min(side, MEMBER_PIXELS))
            shown = [_image_html(picture, f"input {member.image_id}", pixels=MEMBER_PIXELS)] if picture is not None else []
            shown.append(_heatmap_html(square_picture(member.heatmap), f"heatmap of {member.image_id}", pixels=MEMBER_PIXELS))
            title = f"{member.image_id}, predicted {member.pred_label}"
            tiles.append(f'<figure class=member title="{html.escape(title)}"><div class=row>{"".join(shown)}</div>'
                         f"<figcaption>{html.escape(_shorten(member.image_id, 28))}</figcaption></figure>")
        neurons = []
        for n in cluster.distinguishing_neurons:
            key = (n["layer"], int(n["neuron"]))  # a neuron that tells clusters apart is often listed in each
            references = neuron_references_html(run, *key, cls) if key not in pictured else " (references above)"
            pictured.add(key)
            neurons.append(f"<li>{html.escape(labels.get(n['layer'], n['layer']))} #{int(n['neuron'])}: "
                           f"{percent(n['frequency_inside'])} of the cluster, {percent(n['frequency_outside'])} of the rest"
                           f"{references}</li>")
        listed = (f"<p>distinguishing neurons (how often selected):</p><ul>{''.join(neurons)}</ul>" if neurons else
                  "<p class=note>no distinguishing neurons (one cluster, or equal shares)</p>")
        colour = strategy_figures.cluster_colour(cluster.cluster)
        parts.append(f'<div class=cluster style="border-left-color: {colour}"><figure>'
                     f'{_heatmap_html(prototype, f"prototype of cluster {cluster.cluster} of class {cls}", pixels=96)}'
                     f"<figcaption>prototype</figcaption></figure><div class=facts><h4>cluster {int(cluster.cluster)}</h4>"
                     f"<p>{int(cluster.images)} images ({percent(cluster.share)} of the class), accuracy "
                     f"{percent(cluster.accuracy)}</p>{listed}</div><div class=members>{''.join(tiles)}</div></div>")
    return (f'<article class=card id="strategies-{html.escape(cls)}"><h3>class {html.escape(str(row.class_name))}: '
            f"{int(row.clusters)} strateg{'ies' if int(row.clusters) != 1 else 'y'} (rank {int(row.rank)})</h3>"
            f'{_figure_html(figure, f"eigenvalues and t-SNE layout of class {cls}", "figure")}{"".join(parts)}</article>')


def _closest(members: pd.DataFrame, prototype: np.ndarray) -> pd.DataFrame:
    """The ``STRATEGY_MEMBERS`` members whose heatmap is closest to the cluster's prototype
    (cosine), ties by image_id: the cluster's most typical images."""
    if members.empty:
        return members
    maps = np.stack([square_picture(h).ravel() for h in members["heatmap"]]).astype(np.float64)
    target = prototype.ravel().astype(np.float64)
    norms = np.linalg.norm(maps, axis=1) * max(np.linalg.norm(target), 1e-30)
    cosine = np.divide(maps @ target, norms, out=np.zeros(len(maps)), where=norms > 0)
    order = np.lexsort((members["image_id"].to_numpy(), -cosine))[:STRATEGY_MEMBERS]
    return members.iloc[order]


def neuron_references_html(run: Run, layer: str, neuron: int, cls: str | None = None) -> str:
    """The reference images of a neuron (docs/method.md §18, "Reference images"), shown after each
    distinguishing neuron of the Strategies section: its first ``REFERENCE_TILES`` in class ``cls``
    (by label) and in the whole run, each the crop of the input with the neuron's conditional
    heatmap over it; empty when the run has none (``lrpscale strategies --no-references``)."""
    from lrpscale.report.figures import heatmap_rgb
    from lrpscale.results.references import crop_pictures, read_references

    rows = read_references(run.store, layer, neuron)
    rows = rows[rows["crop"].notna()]
    scopes = [("run", rows[rows["scope"] == "run"])]
    if cls is not None:
        mine = rows[(rows["scope"] == "class") & (rows["grouping"] == "label") & (rows["class"] == cls)]
        scopes.insert(0, ("class", mine))
    parts = []
    for scope, chosen in scopes:
        tiles = []
        for image_id, rank, score, measure, crop in zip(*(chosen.sort_values("rank").head(REFERENCE_TILES)[name]
                                                           for name in ("image_id", "rank", "score", "measure", "crop"))):
            picture, heatmap = crop_pictures(crop)
            rgb = (heatmap_rgb(heatmap, image=picture) * 255 + 0.5).astype(np.uint8)
            width = max(1, round(REFERENCE_PIXELS * rgb.shape[1] / rgb.shape[0]))
            if rgb.shape[0] > REFERENCE_PIXELS:  # the PNG no larger than shown: a page of many cards stays small
                from PIL import Image

                rgb = np.asarray(Image.fromarray(rgb).resize((width, REFERENCE_PIXELS), Image.BOX))
            where = "in the class" if scope == "class" else "in the run"
            title = f"{image_id}: #{int(rank) + 1} {where}, score {score:.3g} ({measure})"
            tiles.append(f'<img class=map width={width} height={REFERENCE_PIXELS} title="{html.escape(title)}" '
                         f'alt="{html.escape(f"reference {image_id} of {layer} #{neuron}")}" src="{_png_uri(_png(rgb))}">')
        if tiles:
            parts.append(f"<span>{'class' if scope == 'class' else 'run'}: {''.join(tiles)}</span>")
    return f"<div class=references>{''.join(parts)}</div>" if parts else ""


def _summary_section(run: Run, rows: int) -> str:
    info = run.info
    config = info.get("config", {})
    analysis = config.get("analysis", {})
    images = run.arrow("images", ["label", "label_index", "pred"]).to_pandas()
    analysed, errors = _rows(run, "images"), _rows(run, "errors")
    known = images[images["label_index"].notna()]
    correct = known["label_index"] == known["pred"]
    facts = [
        ("run id", info.get("run_id")), ("status", info.get("status")), ("model", info.get("model_id")),
        ("weights", config.get("weights")), ("composite", info.get("composite")),
        ("input", info.get("input")), ("image size", config.get("image_size")),
        ("k sweep", ", ".join(map(str, analysis.get("ks", [])))),
        ("chosen k", f"smallest k with fidelity {analysis.get('score_metric', 'smape').upper()} <= "
                     f"{analysis.get('score_target')}, else the largest"),
        ("images listed", info.get("images")), ("images analysed", analysed), ("errors", errors),
        ("accuracy", f"{correct.mean():.1%} of {len(known)} labelled images" if len(known) else "no labels"),
        ("versions", ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())),
        ("started", _time(info.get("started"))), ("finished", _time(info.get("finished"))),
        ("last start took", _seconds(info.get("seconds_last_start"), info.get("images_per_second_last_start"))),
    ]
    table = "<table class=facts>" + "".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(_text(value))}</td></tr>" for name, value in facts) + "</table>"
    if not len(known):
        return table
    per_class = pd.DataFrame({"class": known["label"], "correct": correct}).groupby("class")["correct"].agg(
        images="size", accuracy="mean").reset_index()
    order = sorted(range(len(per_class)), key=lambda i: (per_class["accuracy"].iat[i],
                                                          class_order(per_class["class"].iat[i])))
    per_class = per_class.iloc[order]
    note = (f"{len(per_class)} classes, lowest accuracy first" if len(per_class) <= rows else
            f"the {rows} of {len(per_class)} classes with the lowest accuracy; accuracy per class: "
            f"median {per_class['accuracy'].median():.1%}, range {per_class['accuracy'].min():.1%} to "
            f"{per_class['accuracy'].max():.1%}")
    return (table + f"<h3>Accuracy per class</h3><p class=note>{html.escape(note)}</p>"
            + _table(per_class.head(rows), {"accuracy": percent}))


def _gallery_section(run: Run, labels: dict[str, str], count: int, chosen: Sequence[str] | None) -> str:
    heatmaps = run.class_heatmaps[run.class_heatmaps["by"] == "label"].set_index("class")
    shown, note = gallery_classes(heatmaps, count, chosen)
    nodes = run.class_nodes[run.class_nodes["by"] == "label"]
    curves = run.k_curves[run.k_curves["by"] == "label"]
    score_target = run.info.get("config", {}).get("analysis", {}).get("score_target")
    swept = sorted(curves["layer"].unique(), key=layer_order)
    overview, cards = [], []
    for cls in shown:
        row = heatmaps.loc[cls]
        heatmap = square_picture(row["heatmap"])
        anchor = f"class-{cls}"
        overview.append(f'<a class=thumb href="#{html.escape(anchor)}">'
                        f'{_heatmap_html(heatmap, f"summary heatmap of class {cls}", pixels=64)}'
                        f"<span>{html.escape(str(row['class_name']))}<br>{percent(row['accuracy'])}</span></a>")
        facts = [f"<p>{int(row['images'])} images, accuracy {percent(row['accuracy'])}</p>"]
        for layer in swept:
            top = nodes[(nodes["class"] == cls) & (nodes["layer"] == layer)].nlargest(5, ["frequency", "mean_relevance"])
            listed = ", ".join(f"{int(n)} ({f:.0%})" for n, f in zip(top["neuron"], top["frequency"]))
            facts.append(f"<p>most often selected neurons of {html.escape(labels.get(layer, layer))} (share of the "
                         f"class's images): {html.escape(listed or 'none')}</p>")
        pictures = [_figure_html(_k_curves_figure(curves[(curves["class"] == cls) & (curves["layer"] == layer)],
                                                  labels.get(layer, layer), score_target),
                                 f"k curves of class {cls} at {labels.get(layer, layer)}", "curves") for layer in swept]
        graph = run.class_graph(cls)
        drawn = (_figure_html(_class_graph_figure(graph, labels), f"critical path of class {cls}", "graph")
                 if graph.number_of_nodes() else "<p class=note>no critical path</p>")
        cards.append(f'<article class=card id="{html.escape(anchor)}"><h3>class {html.escape(str(row["class_name"]))}'
                     f'</h3><div class=row><figure>{_heatmap_html(heatmap, f"summary heatmap of class {cls}")}'
                     f"<figcaption>mean normalised heatmap</figcaption></figure>"
                     f'<div class=facts>{"".join(facts)}</div>{"".join(pictures)}</div>{drawn}</article>')
    legend = ("<p class=note>Heatmaps: red is positive relevance, blue negative, each scaled to its own "
              '99.5th percentile of |relevance| <span class=legend></span>. Graphs: per layer the most frequently '
              "selected neurons (node area = how often), edges seen in at least 10% of the class's images "
              "(width = mean relevance passed down). Curves: mean MSE and SMAPE of the class's images against k "
              "(fidelity: top-k heatmap vs full heatmap; forward-backward: activations vs relevances), dotted "
              "line at the k chosen most often.</p>")
    return (f"<p class=note>{html.escape(note)}</p>{legend}<div class=overview>{''.join(overview)}</div>"
            + "\n".join(cards))


def gallery_classes(heatmaps: pd.DataFrame, count: int, chosen: Sequence[str] | None = None) -> tuple[list[str], str]:
    """Which classes the gallery shows, and a sentence saying which.

    heatmaps: the reducer's summary table by label, indexed by class. chosen: these classes
    (ValueError naming any the run lacks); else all when there are at most ``count``, else the
    ``count`` with the lowest accuracy.
    """
    classes = sorted(heatmaps.index, key=class_order)
    if chosen:
        missing = [c for c in chosen if c not in heatmaps.index]
        if missing:
            raise ValueError(f"no class {', '.join(map(repr, missing))} among the run's labels "
                             f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
        return list(chosen), f"The {len(chosen)} classes asked for, of {len(classes)}."
    if len(classes) <= count:
        return classes, f"All {len(classes)} classes (by true label)."
    worst = sorted(classes, key=lambda c: (heatmaps.loc[c, "accuracy"], class_order(c)))[:count]
    return worst, (f"The {count} of {len(classes)} classes with the lowest accuracy, lowest first (pick others "
                   "with --classes, or more with --gallery).")


def _trust_section(run: Run, rows: int) -> str:
    """Faithfulness of the run's heatmaps on the audit's perturbed sample (curves, per-class AOPC)
    and, once ``lrpscale evaluate`` ran, every composite against the gradient baselines with the
    randomisation cascade (docs/method.md §16-17)."""
    from lrpscale.report import trust_figures
    from lrpscale.results.faithfulness import ORDERS, mean_curves

    analysis = run.info.get("config", {}).get("analysis", {})
    composite = run.info.get("composite") or analysis.get("composite")
    heatmaps = run.class_heatmaps
    parts = ['<p class=note>Region perturbation removes the patches a heatmap ranks most relevant first (MoRF): '
             "the target logit should fall faster than when the same patches go in a random order. AOPC is the mean "
             "drop over the steps; MoRF minus random near 0 or below means the heatmap ranks regions no better than "
             "chance.</p>"]
    curves = run.faithfulness_curves if "faithfulness_images" in heatmaps else pd.DataFrame()
    by_pred = curves[curves["by"] == "pred"] if len(curves) else curves
    if by_pred.empty:
        parts.append(f"<p class=note>No image of this run was perturbed (analysis.faithfulness_sample = "
                     f"{html.escape(_text(analysis.get('faithfulness_sample')))}).</p>")
    else:
        # each perturbed image is in exactly one predicted class: class means weighted by images give the run's
        weighted = by_pred.assign(total=by_pred["drop"] * by_pred["images"])
        overall = weighted.groupby(["order", "step"], as_index=False).agg(
            fraction=("fraction", "first"), images=("images", "sum"), total=("total", "sum"))
        overall["drop"] = overall["total"] / overall["images"]
        classes = heatmaps[(heatmaps["by"] == "pred") & (heatmaps["faithfulness_images"] > 0)]
        perturbed = int(classes["faithfulness_images"].sum())
        aopc = {order: float((classes[f"aopc_{order}"] * classes["faithfulness_images"]).sum() / perturbed)
                for order in ORDERS}
        share = analysis.get("faithfulness_sample")
        sample = f"{perturbed} perturbed images ({percent(share) if share else share} seeded sample)"
        parts.append(f"<p>{html.escape(str(composite))}, {html.escape(sample)}: mean AOPC MoRF {aopc['morf']:.3g}, "
                     f"random {aopc['random']:.3g}, LeRF {aopc['lerf']:.3g}.</p>")
        parts.append(_figure_html(trust_figures.perturbation_curves_figure(overall, aopc={None: aopc},
                                                                           title=f"{composite}: {sample}"),
                                  "mean drop of the target logit against the fraction removed, per order", "figure"))
        per_class = heatmaps[(heatmaps["by"] == "label") & (heatmaps["faithfulness_images"] > 0)]
        per_class = per_class.sort_values(["morf_minus_random", "class"], key=lambda c: c.map(class_order)
                                          if c.name == "class" else c, ignore_index=True)
        shown = per_class[["class", "faithfulness_images", "aopc_morf", "aopc_random", "aopc_lerf", "morf_minus_random"]]
        shown = shown.rename(columns={"faithfulness_images": "perturbed images"})
        note = (f"{len(per_class)} classes (by label), least faithful first" if len(per_class) <= rows else
                f"the {rows} of {len(per_class)} classes (by label) whose heatmaps beat the random order least")
        parts.append(f"<h3>AOPC per class</h3><p class=note>{html.escape(note)}</p>"
                     + _table(shown.head(rows), {name: "{:.3g}".format for name in shown.columns[2:]}))
    evaluations = run.evaluations()
    if evaluations.empty:
        parts.append("<p class=note>Run <code>lrpscale evaluate RUN</code> to compare every composite with the "
                     "gradient baselines on a sample and to check that the heatmaps depend on the model "
                     "(randomisation cascade, eMPRT).</p>")
        return "\n".join(parts)
    summary = run.evaluation_summary()
    methods = pd.DataFrame(summary["methods"])
    parts.append(f"<h3>Composites against gradient baselines</h3><p class=note>Evaluation "
                 f"{html.escape(summary['settings_id'])}: {summary['images']} images; most faithful composite "
                 f"(largest MoRF minus random): <b>{html.escape(_text(summary.get('most_faithful')))}</b>. "
                 "After the last cascade step a heatmap should keep no rank correlation (near 0); an eMPRT entropy "
                 "ratio above 1 means the heatmap turns to noise when the model does.</p>"
                 + _table(methods, {name: "{:.3g}".format for name in methods.columns if name != "method"}))
    points = run.evaluation("faithfulness")
    method_curves = mean_curves(points, ("method", "order"))
    aopc_of = {row["method"]: {order: row[f"aopc_{order}"] for order in ORDERS} for row in summary["methods"]}
    parts.append(_figure_html(trust_figures.perturbation_curves_figure(method_curves, panel="method", aopc=aopc_of),
                              "mean drop of the target logit per method and order", "figure"))
    checks = run.evaluation("randomisation")
    if (checks["check"] == "cascade").any():
        parts.append(_figure_html(trust_figures.cascade_figure(checks), "randomisation cascade per method", "figure"))
    return "\n".join(parts)


def _worst_section(run: Run, labels: dict[str, str], rows: int) -> str:
    worst = run.worst_explained(rows)
    if worst.empty:
        return "<p class=note>No scores in this run.</p>"
    images = run.table("images", ["image_id", "uri", "label", "pred_label", "prob", "heatmap", "heatmap_scale"],
                       ds.field("image_id").isin(worst["image_id"].tolist())).set_index("image_id")
    side = int(run.info.get("config", {}).get("image_size") or INPUT_PIXELS)
    cards = []
    for position, score in enumerate(worst.itertuples(), 1):
        image = images.loc[score.image_id]
        heatmap = square_picture(image["heatmap"])
        picture = _input_picture(image["uri"], min(side, INPUT_PIXELS))
        shown = [_image_html(picture, f"input {score.image_id}") if picture is not None else
                 "<div class=missing>input not readable here</div>",
                 _heatmap_html(heatmap, f"heatmap of {score.image_id}")]
        if picture is not None:
            shown.append(_heatmap_html(heatmap, f"overlay of {score.image_id}", image=_resized(picture, heatmap.shape[0])))
        wrong = image["label"] is not None and image["label"] != image["pred_label"]
        caption = (f"#{position} {score.image_id}: label {image['label']}, predicted {image['pred_label']} "
                   f"(p = {image['prob']:.2f}); {labels.get(score.layer, score.layer)} k* = {score.k}, "
                   f"SMAPE {score.smape:.1f}%, MSE {score.mse:.2e}")
        cards.append(f'<figure class="tile{" wrong" if wrong else ""}"><div class=row>{"".join(shown)}</div>'
                     f'<figcaption>{html.escape(caption)}'
                     f'<br><span class=uri>{html.escape(str(image["uri"]))}</span></figcaption></figure>')
    note = (f"The {len(worst)} images whose top-k* neurons reproduce their heatmap worst (highest fidelity SMAPE "
            f"at the chosen k, of {_analysed_images(run)} images): input, heatmap, overlay.")
    return f"<p class=note>{html.escape(note)}</p><div class=tiles>{''.join(cards)}</div>"


def _analysed_images(run: Run) -> int:
    """Images the run analysed, from the reducer's per-prediction class counts (every analysed image has one)."""
    heatmaps = run.class_heatmaps
    return int(heatmaps.loc[heatmaps["by"] == "pred", "images"].sum())


def _errors_section(run: Run, rows: int) -> str:
    errors = run.errors
    if errors.empty:
        return "<p class=note>No input failed.</p>"
    kinds = errors.groupby(["stage", "error_type"]).agg(inputs=("image_id", "size"), example=("message", "first"))
    note = f"{len(errors)} inputs could not be analysed" + (f"; the first {rows} are listed" if len(errors) > rows else "")
    return (_table(kinds.reset_index().sort_values("inputs", ascending=False), {"example": _shorten}) +
            f"<p class=note>{html.escape(note)}.</p>" +
            _table(errors.sort_values("image_id").head(rows)[["image_id", "uri", "stage", "error_type", "message"]],
                   {"message": _shorten}))


def _comparison_section(comparison, before: Run, after: Run, rows: int) -> str:
    s = comparison.summary
    facts = [("run A (before)", f"{s['run_a']}: {s['model_a']}, {s.get('composite_a')}, {before.path}"),
             ("run B (this run)", f"{s['run_b']}: {s['model_b']}, {s.get('composite_b')}, {after.path}"),
             ("images", f"{s['images_a']} in A, {s['images_b']} in B, {s['images_common']} in both"),
             ("accuracy", f"{percent(s['accuracy_a'])} in A, {percent(s['accuracy_b'])} in B"),
             ("predictions changed", f"{s['prediction_changed']} of {s['images_common']}"),
             ("mean heatmap cosine per image", f"{s['mean_heatmap_cosine']:.3f}"),
             ("mean critical-path overlap per class", f"neurons {s['mean_node_jaccard']:.3f}, "
                                                      f"edges {s['mean_edge_jaccard']:.3f} (Jaccard)")]
    table = "<table class=facts>" + "".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>" for name, value in facts) + "</table>"
    drift = comparison.classes.sort_values(["heatmap_cosine", "class"], ignore_index=True).head(rows)
    maps = {key: run.class_heatmaps[run.class_heatmaps["by"] == "label"].set_index("class")["heatmap"]
            for key, run in (("a", before), ("b", after))}
    table_rows = pd.DataFrame({
        "class": drift["class"],
        "heatmap A, B": ["".join(_heatmap_html(square_picture(maps[key][c]), f"class {c} in run {key.upper()}", pixels=48)
                                 if c in maps[key].index else "<span class=missing>-</span>" for key in ("a", "b"))
                         for c in drift["class"]],
        "images A, B": [f"{a}, {b}" for a, b in zip(drift["images_a"], drift["images_b"])],
        "accuracy A → B": [f"{percent(a)} → {percent(b)}" for a, b in zip(drift["accuracy_a"], drift["accuracy_b"])],
        "heatmap cosine": drift["heatmap_cosine"], "heatmap MSE": drift["heatmap_mse"],
        "neurons Jaccard": drift["node_jaccard"], "edges Jaccard": drift["edge_jaccard"],
        "mean k* A → B": [f"{a:.1f} → {b:.1f}" for a, b in zip(drift["k_a"], drift["k_b"])],
        "SMAPE at k* A → B": [f"{a:.1f}% → {b:.1f}%" for a, b in zip(drift["smape_a"], drift["smape_b"])],
    })
    cut = len(comparison.classes) > rows
    class_note = ("Classes by drift of their summary heatmap (lowest cosine first)"
                  + (f", the first {rows} of {len(comparison.classes)}" if cut else "") + "; critical-path overlap as "
                  "Jaccard index of the class graphs' neurons and edges.")
    changed = comparison.images.head(min(rows, CHANGED_IMAGES))
    uris = after.table("images", ["image_id", "uri"], ds.field("image_id").isin(changed["image_id"].tolist()))
    uris = dict(zip(uris["image_id"], uris["uri"]))
    side = int(after.info.get("config", {}).get("image_size") or INPUT_PIXELS)
    tiles = []
    for row in changed.itertuples():
        picture = _input_picture(uris.get(row.image_id), min(side, INPUT_PIXELS))
        shown = [_image_html(picture, f"input {row.image_id}")] if picture is not None else []
        shown += [_heatmap_html(before.heatmap(row.image_id), f"{row.image_id} in run A"),
                  _heatmap_html(after.heatmap(row.image_id), f"{row.image_id} in run B")]
        caption = (f"{row.image_id} (label {row.label}): predicted {row.pred_a} in A, {row.pred_b} in B; heatmap "
                   f"cosine {row.heatmap_cosine:.3f}; SMAPE at k* {row.smape_a:.1f}% in A, {row.smape_b:.1f}% in B")
        tiles.append(f'<figure class="tile{" changed" if row.prediction_changed else ""}"><div class=row>{"".join(shown)}</div>'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    images_note = (f"The {len(changed)} images that changed most, prediction changes first, then the lowest heatmap "
                   "cosine: input, heatmap in A, heatmap in B (each on its own colour scale).")
    return (table + f"<h3>Per class</h3><p class=note>{html.escape(class_note)}</p>"
            + _table(table_rows, raw={"heatmap A, B"})
            + f"<h3>Images</h3><p class=note>{html.escape(images_note)}</p><div class=tiles>{''.join(tiles)}</div>")


# --- pictures ------------------------------------------------------------------------------------

def _class_graph_figure(graph, labels: dict[str, str]):
    from lrpscale.report import figures

    return figures.path_graph_figure(graph, layer_labels=labels, size_attr="frequency", width_attr="relevance")


def _k_curves_figure(curves: pd.DataFrame, layer: str, score_target: float | None):
    """Mean MSE/SMAPE against k of one class at one swept layer, per variant (the k_curves table's rows)."""
    from lrpscale.report import figures

    ks = sorted(curves["k"].unique())
    scores = {}
    for variant, rows in curves.groupby("variant", sort=False):
        rows = rows.set_index("k").reindex(ks)
        scores[variant] = (rows["mean_mse"].to_numpy(), rows["mean_smape"].to_numpy())
    fidelity = curves[curves["variant"] == "fidelity"]
    chosen = int(fidelity.loc[fidelity["chosen_fraction"].idxmax(), "k"]) if len(fidelity) else None
    return figures.score_curves_figure(ks, scores, chosen, score_target, title=f"{layer}: scores against k")


def _figure_html(figure, alt: str, kind: str) -> str:
    """A matplotlib figure as an <img>, its PNG cut to a 256-colour palette (a third of the bytes)."""
    from PIL import Image

    from lrpscale.report import figures

    picture = Image.open(io.BytesIO(figures.figure_png(figure, FIGURE_DPI))).convert("RGB").quantize(256)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return f'<img class={kind} alt="{html.escape(alt)}" src="{_png_uri(buffer.getvalue())}">'


def _heatmap_html(heatmap: np.ndarray, alt: str, image: np.ndarray | None = None, pixels: int = HEATMAP_PIXELS) -> str:
    """A heatmap at its stored resolution as PNG, shown ``pixels`` wide without smoothing."""
    from lrpscale.report.figures import heatmap_rgb

    rgb = (heatmap_rgb(heatmap, image=image) * 255 + 0.5).astype(np.uint8)
    return (f'<img class=map width={pixels} height={pixels} alt="{html.escape(alt)}" '
            f'src="{_png_uri(_png(rgb))}">')


def _image_html(picture: np.ndarray, alt: str, pixels: int = HEATMAP_PIXELS) -> str:
    return (f'<img class=map width={pixels} height={pixels} alt="{html.escape(alt)}" '
            f'src="{_png_uri(_png((picture * 255 + 0.5).astype(np.uint8)))}">')


def _input_picture(uri: str | None, side: int) -> np.ndarray | None:
    """The input behind ``uri`` as the model saw it (shorter side resized, centre crop), (side, side, 3)
    in [0, 1]; None unless the uri is a readable image file, local or on a store (a Parquet row or
    tar member, ``...#key``, is not opened)."""
    from lrpscale.inputs.decoding import decode
    from lrpscale.inputs.errors import InputError
    from lrpscale.inputs.preprocess import preprocess

    if not uri or "#" in uri:
        return None
    try:
        filesystem, path = resolve(uri)
        info = filesystem.get_file_info(path)
        if info.type != pafs.FileType.File or info.size > MAX_INPUT_BYTES:
            return None
        with filesystem.open_input_stream(path) as stream:
            pixels = preprocess(decode(stream.read()), side, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    except (OSError, InputError, ValueError):
        return None
    return np.clip(pixels.transpose(1, 2, 0), 0.0, 1.0)


def _resized(picture: np.ndarray, side: int) -> np.ndarray:
    """An (H, W, 3) picture in [0, 1] resized to (side, side, 3), to lie under a heatmap."""
    from PIL import Image

    image = Image.fromarray((picture * 255 + 0.5).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    return np.asarray(image, np.float32) / 255.0


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --- tables and text -----------------------------------------------------------------------------

def _table(frame: pd.DataFrame, formats: dict[str, Callable] | None = None, raw: set[str] = frozenset()) -> str:
    """A DataFrame as an HTML table; ``formats``: column -> value formatter; ``raw``: columns holding HTML."""
    formats = formats or {}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for values in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, values):
            text = formats.get(column, _text)(value)
            numeric = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            cells.append(f"<td{' class=num' if numeric else ''}>{text if column in raw else html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class=scroll><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def _text(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"
    return str(value)


def _shorten(text, limit: int = 160) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _time(stamp) -> str | None:
    return None if stamp is None else datetime.datetime.fromtimestamp(stamp).astimezone().strftime(
        "%Y-%m-%d %H:%M:%S %Z")


def _seconds(seconds, rate) -> str | None:
    return None if seconds is None else f"{seconds:.1f} s" + (f" ({rate:.1f} images/s)" if rate else "")


def _rows(run: Run, table: str) -> int:
    return run.store.committed_rows(table)


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #263238; color: #fff; padding: 12px 24px; position: sticky; top: 0; z-index: 1; }
header h1 { font-size: 20px; margin: 0 0 6px 0; font-weight: 600; }
.warning { background: #fff3e0; border-left: 4px solid #e65100; padding: 8px 12px; margin: 12px 0; }
nav a { color: #b3e5fc; margin-right: 16px; text-decoration: none; font-size: 14px; }
main { padding: 8px 24px 24px; max-width: 1400px; }
section { margin-top: 24px; }
h2 { font-size: 18px; border-bottom: 2px solid #263238; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 8px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 12px; background: #fff; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: middle; }
thead th { background: #eceff1; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.facts th { background: #eceff1; width: 200px; }
.scroll { overflow-x: auto; }
.note { color: #555; font-size: 13px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px; margin: 12px 0; }
.row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.facts p { margin: 4px 0; font-size: 13px; }
div.facts { flex: 1 1 260px; max-width: 420px; }
figure { margin: 0; }
figcaption { font-size: 12px; color: #444; max-width: 420px; }
img { max-width: 100%; height: auto; }
img.map { image-rendering: pixelated; border: 1px solid #ccc; }
img.curves { max-width: min(100%, 600px); }
img.figure { max-width: min(100%, 1000px); }
.overview { display: flex; flex-wrap: wrap; gap: 8px; margin: 8px 0; }
.thumb { display: flex; flex-direction: column; align-items: center; font-size: 12px; color: #222;
  text-decoration: none; text-align: center; }
.tile.wrong, .tile.changed { border-color: #c0392b; }
.tile.wrong figcaption::before { content: "misclassified: "; color: #c0392b; font-weight: 600; }
.tile.changed figcaption::before { content: "prediction changed: "; color: #c0392b; font-weight: 600; }
td .map { margin-right: 4px; }
td { white-space: nowrap; }
td:last-child { white-space: normal; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(430px, 1fr)); gap: 12px; }
.tile { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
.uri { color: #777; word-break: break-all; }
.missing { width: 128px; height: 128px; display: flex; align-items: center; justify-content: center;
  text-align: center; font-size: 12px; color: #777; border: 1px dashed #bbb; }
.legend { display: inline-block; width: 120px; height: 10px; vertical-align: middle; border: 1px solid #ccc;
  background: linear-gradient(to right, #0000ff, #ffffff, #ff0000); }
footer { color: #777; font-size: 12px; padding: 12px 24px; }
.cluster { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; border-left: 6px solid #ccc;
  padding: 6px 10px; margin: 8px 0; background: #fcfcfc; }
.cluster h4 { margin: 0 0 4px 0; font-size: 14px; }
.cluster ul { margin: 2px 0; padding-left: 18px; font-size: 13px; }
.members { display: flex; flex-wrap: wrap; gap: 8px; }
.member figcaption { font-size: 11px; color: #555; }
.references { margin: 2px 0 6px; }
.references span { display: inline-flex; gap: 3px; align-items: center; margin-right: 10px; font-size: 11px; color: #555; }
"""
