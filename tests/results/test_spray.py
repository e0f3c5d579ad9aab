"""SpRAy's spectral core (docs/method.md §18) against CoRelAy 1.0's own processors, on scikit-learn's
digits and on planted groups, and against cases worked out by hand: pooling of a 4x4 map, the
neighbours of points on a line, two far-apart groups, the eigengap rule, the cap and tiny classes."""
from __future__ import annotations

import importlib.metadata
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import pdist, squareform
from sklearn.datasets import load_digits
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from lrpscale.results.spray import (
    analyse_class,
    channel_features,
    cluster,
    embed_2d,
    heatmap_features,
    knn_affinity,
    normalised_affinity,
    spectrum,
    suggested_clusters,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One BLAS/OpenMP thread: on a shared 2-core machine scikit-learn's OpenMP t-SNE spins
    itself ten times slower, and one thread makes t-SNE layouts repeatable."""
    with threadpool_limits(limits=1):
        yield


def planted_heatmaps(per_group=(20, 20, 20), side: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, side, side) float32 heatmaps in groups whose relevance sits in one of three corners,
    plus weak noise everywhere; returns the maps and each map's group."""
    rng = np.random.default_rng(seed)
    corners = [(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(side - 4, side)), (slice(side - 4, side), slice(0, 4))]
    maps, groups = [], []
    for group, count in enumerate(per_group):
        block = rng.normal(0.0, 0.05, (count, side, side))
        block[:, corners[group][0], corners[group][1]] += rng.uniform(0.5, 1.5, (count, 4, 4))
        maps.append(block)
        groups += [group] * count
    return np.concatenate(maps).astype(np.float32), np.array(groups)


def digits_heatmaps() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float32 maps: the digits' pixels with seeded noise (the pixels are integers,
    so without noise many distances would tie and the neighbour sets would not be unique)."""
    digits = load_digits()
    noise = np.random.default_rng(0).normal(0.0, 0.01, digits.images.shape)
    return (digits.images + noise).astype(np.float32), digits.target


def feature_sets() -> dict[str, np.ndarray]:
    heatmaps, labels = digits_heatmaps()
    return {
        # 1797 images: above the dense limit, so ARPACK's path
        "digits": heatmap_features(heatmaps),
        # one class pooled to 4x4 (p = 2): LAPACK's path, a spread spectrum with negative eigenvalues
        "digit-one": heatmap_features(heatmaps[labels == 1], max_side=4),
        # three groups with no edge between them: three zero eigenvalues
        "planted": heatmap_features(planted_heatmaps()[0]),
    }


FEATURES = feature_sets()


def corelay_spectrum(features: np.ndarray, which: str = "LM"):
    """CoRelAy's SpRAy pipeline pieces: pdist -> SparseKNN(10) -> SymmetricNormalLaplacian ->
    EigenDecomposition(32). Returns the affinity, the Laplacian eigenvalues as it reports them and its
    row-normalised eigenvectors."""
    pytest.importorskip("corelay")
    assert importlib.metadata.version("corelay") == "1.0.0"
    from corelay.processor.affinity import SparseKNN
    from corelay.processor.distance import SciPyPDist
    from corelay.processor.embedding import EigenDecomposition
    from corelay.processor.laplacian import SymmetricNormalLaplacian

    affinity = SparseKNN(n_neighbors=10, symmetric=True)(SciPyPDist(metric="euclidean")(features))
    eigenvalues, eigenvectors = EigenDecomposition(n_eigval=32, which=which)(SymmetricNormalLaplacian()(affinity))
    return affinity, eigenvalues, eigenvectors


def assert_unique_neighbours(features: np.ndarray, k: int = 10) -> None:
    """No tie at the k-th neighbour and no duplicate image: the neighbour sets are then unique and
    any correct implementation must give exactly CoRelAy's affinity."""
    distances = np.sort(squareform(pdist(features)), axis=1)
    assert (distances[:, 1] > 0).all()
    assert (distances[:, k] < distances[:, k + 1]).all()


# --- CoRelAy as the oracle -------------------------------------------------------------------

@pytest.mark.parametrize("name", FEATURES)
def test_affinity_is_corelays(name):
    features = FEATURES[name]
    theirs, _, _ = corelay_spectrum(features)
    assert_unique_neighbours(features)
    ours = knn_affinity(features, k=10)
    assert ours.shape == theirs.shape
    assert (ours != theirs).nnz == 0
    assert set(np.unique(ours.data)) == {0.5, 1.0}  # one-way and mutual neighbours both occur


@pytest.mark.parametrize("name", FEATURES)
def test_eigenvalues_are_corelays(name):
    """Against CoRelAy asked for the largest algebraic eigenvalues (our choice), and its suggested count."""
    features = FEATURES[name]
    _, theirs, _ = corelay_spectrum(features, which="LA")
    ours = spectrum(features, k=10, n_eigval=32)
    assert ours.eigenvalues.shape == (32,) and ours.eigenvectors.shape == (len(features), 32)
    np.testing.assert_allclose(ours.eigenvalues, np.sort(theirs), atol=1e-6)
    assert suggested_clusters(ours.eigenvalues) == pytest.approx(suggested_clusters(np.sort(theirs)), abs=1e-6)


def test_corelays_default_agrees_below_one_and_differs_above():
    """CoRelAy's default (largest magnitude) gives the same eigenvalues on the digits; on one class
    with a spread spectrum it swaps the largest ones for negative eigenvalues (Laplacian > 1), and
    the ones it keeps below 1 are exactly our smallest (docs/method.md §18)."""
    _, theirs, _ = corelay_spectrum(FEATURES["digits"])
    assert (theirs < 1).all()
    np.testing.assert_allclose(spectrum(FEATURES["digits"]).eigenvalues, np.sort(theirs), atol=1e-6)

    _, theirs, _ = corelay_spectrum(FEATURES["digit-one"])
    below = np.sort(theirs[theirs < 1])
    assert 0 < below.size < 32
    ours = spectrum(FEATURES["digit-one"]).eigenvalues
    np.testing.assert_allclose(ours[:below.size], below, atol=1e-6)
    assert (ours < 1).all()


def test_planted_groups_cluster_as_corelays_kmeans_on_the_leading_eigenvectors():
    """CoRelAy's KMeans on its eigenvectors of the 3 smallest Laplacian eigenvalues (its last
    columns) finds our partition, the planted groups. On all 32, as its SpectralClustering
    pipeline does, the 29 within-group eigenvectors swamp the 3 that separate the groups."""
    features = FEATURES["planted"]
    groups = planted_heatmaps()[1]
    _, theirs, their_vectors = corelay_spectrum(features, which="LA")
    from corelay.processor.clustering import KMeans

    count, _ = suggested_clusters(np.sort(theirs))
    leading = KMeans(n_clusters=count, index=(slice(None), slice(-count, None)), kwargs={"n_init": 10, "random_state": 0})
    everything = KMeans(n_clusters=count, kwargs={"n_init": 10, "random_state": 0})
    strategies = analyse_class(features, seed=0)
    assert strategies.suggested_clusters == count == 3
    assert adjusted_rand_score(groups, strategies.cluster) == 1.0
    assert adjusted_rand_score(leading(their_vectors), strategies.cluster) == 1.0
    assert adjusted_rand_score(groups, everything(their_vectors)) < 0.9


# --- features --------------------------------------------------------------------------------

def test_heatmap_features_pool_a_4x4_map_by_hand():
    heatmap = np.array([[1, 2, 0, 0],
                        [3, 4, 0, -2],
                        [0, 0, -1, 0],
                        [0, 0, 0, -5]], dtype=np.float16)[None]
    # 2x2 block sums 10, -2 / 0, -6; sum of |values| 18
    features = heatmap_features(heatmap, max_side=2)
    assert features.dtype == np.float64
    np.testing.assert_allclose(features, [[10 / 18, -2 / 18, 0, -6 / 18]])
    # no pooling when the map fits
    np.testing.assert_allclose(heatmap_features(heatmap, max_side=4), heatmap.reshape(1, -1).astype(np.float64) / 18.0)


def test_heatmap_features_pad_bottom_right():
    # 5x5 ones, at most 2x2: p = 3, padded to 6x6, so blocks of 9, 6 / 6, 4 ones
    features = heatmap_features(np.ones((1, 5, 5), dtype=np.float32), max_side=2)
    np.testing.assert_allclose(features, [[9 / 25, 6 / 25, 6 / 25, 4 / 25]])
    # a 224 px map at most 32x32: p = 7, exactly 32x32
    assert heatmap_features(np.ones((2, 224, 224), dtype=np.float16)).shape == (2, 32 * 32)


def test_heatmap_features_keep_zero_maps_zero_and_check_shapes():
    features = heatmap_features(np.zeros((3, 6, 6), dtype=np.float16))
    assert features.shape == (3, 36) and not features.any()
    with pytest.raises(ValueError, match=r"\(N, S, S\), got \(6, 6\)"):
        heatmap_features(np.zeros((6, 6)))
    with pytest.raises(ValueError, match="NaN"):
        heatmap_features(np.full((1, 2, 2), np.nan))


def test_channel_features_by_hand():
    features = channel_features(np.array([[1.0, -3.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32))
    assert features.dtype == np.float64
    np.testing.assert_allclose(features, [[0.125, -0.375, 0.0, 0.5], [0, 0, 0, 0]])


# --- affinity and normalisation --------------------------------------------------------------

def test_knn_affinity_of_points_on_a_line():
    # at 0, 1, 3, 7 the nearest neighbours are 1, 0, 1, 2: 0 and 1 mutual, 2 -> 1 and 3 -> 2 one way
    affinity = knn_affinity(np.array([[0.0], [1.0], [3.0], [7.0]]), k=1)
    np.testing.assert_array_equal(affinity.toarray(), [[0, 1, 0, 0],
                                                       [1, 0, 0.5, 0],
                                                       [0, 0.5, 0, 0.5],
                                                       [0, 0, 0.5, 0]])


def test_knn_affinity_ties_duplicates_and_small_classes():
    # 0 has 1 and 2 at the same distance: the lower index wins
    tied = knn_affinity(np.array([[0.0], [1.0], [-1.0]]), k=1).toarray()
    np.testing.assert_array_equal(tied[0], [0, 1, 0.5])
    # exact twins: each is the other's neighbour, never its own
    points = np.random.default_rng(1).normal(size=(10, 3))
    twins = knn_affinity(np.concatenate([points, points]), k=1).toarray()
    assert not twins.diagonal().any()
    np.testing.assert_array_equal(twins[np.arange(10), np.arange(10) + 10], 1.0)
    # fewer than k + 1 images: everyone is everyone's neighbour
    complete = knn_affinity(points[:4], k=10).toarray()
    np.testing.assert_array_equal(complete, 1.0 - np.eye(4))
    assert knn_affinity(points[:1], k=10).toarray().tolist() == [[0.0]]
    assert knn_affinity(np.zeros((0, 3)), k=10).shape == (0, 0)


def test_knn_affinity_blocks_match_pdist_ranking():
    """Many images in blocks of Gram-form distances: the same neighbours as a full pdist sort."""
    features = FEATURES["digits"][:600]
    assert_unique_neighbours(features, k=7)
    order = np.argsort(squareform(pdist(features)), axis=1)[:, 1:8]
    expected = np.zeros((600, 600))
    expected[np.repeat(np.arange(600), 7), order.ravel()] = 1
    np.testing.assert_array_equal(knn_affinity(features, k=7).toarray(), (expected + expected.T) / 2)


def test_normalised_affinity_by_hand_with_an_isolated_image():
    affinity = np.array([[0, 1, 0.5, 0], [1, 0, 0, 0], [0.5, 0, 0, 0], [0, 0, 0, 0]])
    # degrees 1.5, 1, 0.5, 0
    expected = np.array([[0, 1 / math.sqrt(1.5), 0.5 / math.sqrt(0.75), 0],
                         [1 / math.sqrt(1.5), 0, 0, 0],
                         [0.5 / math.sqrt(0.75), 0, 0, 0],
                         [0, 0, 0, 0]])
    np.testing.assert_allclose(normalised_affinity(affinity).toarray(), expected)


# --- spectrum, eigengap, clustering ----------------------------------------------------------

def two_groups(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(12, 4) features in two groups of 6, 100 apart; returns them and each point's group. With
    k = 5 each group is a complete graph K6 with no edge to the other: normalised affinity 1/5 off
    the diagonal, so the Laplacian eigenvalues are 0 twice, then 6/5 ten times."""
    rng = np.random.default_rng(seed)
    features = np.concatenate([rng.normal(0, 1, (6, 4)), rng.normal(100, 1, (6, 4))])
    return features, np.repeat([0, 1], 6)


def test_two_far_groups_give_two_zero_eigenvalues_and_a_clean_split():
    features, groups = two_groups()
    result = spectrum(features, k=5, n_eigval=8)
    np.testing.assert_allclose(result.eigenvalues, [0, 0] + [1.2] * 6, atol=1e-12)
    assert suggested_clusters(result.eigenvalues) == pytest.approx((2, 1.2))
    # equal sizes: the cluster of the first image is 0
    np.testing.assert_array_equal(cluster(result.eigenvectors, 2, seed=0), groups)


def test_clusters_are_numbered_by_size():
    embedding = np.array([[1.0, 0.0]] * 3 + [[0.0, 2.0]] * 6 + [[3.0, 0.0]] * 2)
    np.testing.assert_array_equal(cluster(embedding, 2, seed=0), [1] * 3 + [0] * 6 + [1] * 2)


def test_sparse_solver_finds_repeated_zero_eigenvalues():
    features = FEATURES["planted"]
    dense = spectrum(features, solver="dense")
    sparse = spectrum(features, solver="sparse")
    np.testing.assert_allclose(dense.eigenvalues[:3], 0.0, atol=1e-10)
    np.testing.assert_allclose(sparse.eigenvalues, dense.eigenvalues, atol=1e-9)
    with pytest.raises(ValueError, match="solver='dense'"):
        spectrum(features[:20], n_eigval=32, solver="sparse")


@pytest.mark.parametrize("eigenvalues, max_clusters, expected", [
    ([0, 0, 0, 0.5, 0.6, 0.7], 10, (3, 0.5)),
    ([0, 0.1, 0.9, 1.0], 10, (2, 0.8)),
    ([0, 0.25, 0.5, 0.75, 1.0], 10, (2, 0.25)),   # equal gaps: the smaller count
    ([0, 0, 0, 0, 0, 1], 3, (2, 0.0)),            # the gap after the 5th is beyond max_clusters
    ([0, 0, 0, 0, 0, 1], 5, (5, 1.0)),
    ([0, 0.5, 1], 10, (2, 0.5)),
])
def test_suggested_clusters_by_hand(eigenvalues, max_clusters, expected):
    count, gap = suggested_clusters(np.array(eigenvalues), max_clusters)
    assert count == expected[0] and gap == pytest.approx(expected[1])


@pytest.mark.parametrize("eigenvalues, expected", [([], 0), ([1.0], 1), ([0.0, 2.0], 1)])
def test_suggested_clusters_without_a_gap(eigenvalues, expected):
    count, gap = suggested_clusters(np.array(eigenvalues))
    assert count == expected and math.isnan(gap)


def test_cluster_normalises_rows():
    # by direction: (1, 0) with (10, 0), (0, 1) with (0, 10); raw k-means would set (10, 0) apart
    embedding = np.array([[1.0, 0.0], [10.0, 0.0], [0.0, 1.0], [0.0, 10.0], [0.0, 0.0]])
    np.testing.assert_array_equal(cluster(embedding[:4], 2, seed=0), [0, 0, 1, 1])
    assert cluster(embedding, 2, seed=0)[:4].tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])  # a zero row is no error


def test_cluster_checks_its_count():
    features, _ = two_groups()
    vectors = spectrum(features, k=5, n_eigval=4).eigenvectors
    assert not cluster(vectors, 1, seed=0).any()
    with pytest.raises(ValueError, match="n_clusters"):
        cluster(vectors[:3], 4, seed=0)
    with pytest.raises(ValueError, match="columns"):
        cluster(vectors, 5, seed=0)


# --- embedding, the cap, tiny classes --------------------------------------------------------

def test_embed_2d_small_classes_and_seed():
    assert embed_2d(np.zeros((0, 3)), seed=0).shape == (0, 2)
    np.testing.assert_array_equal(embed_2d(np.ones((1, 3)), seed=0), [[0, 0]])
    np.testing.assert_array_equal(embed_2d(np.ones((2, 3)), seed=0), [[-1, 0], [1, 0]])
    assert np.isfinite(embed_2d(np.random.default_rng(0).normal(size=(3, 5)), seed=0)).all()
    features = two_groups()[0]
    layout = embed_2d(features, seed=4)
    assert layout.shape == (12, 2) and layout.dtype == np.float64
    np.testing.assert_array_equal(layout, embed_2d(features, seed=4))


def test_analyse_class_below_the_cap():
    features, groups = two_groups()
    strategies = analyse_class(features, k=5, n_eigval=8, seed=0)
    assert strategies.sampled.all() and np.isfinite(strategies.x).all() and np.isfinite(strategies.y).all()
    assert (strategies.suggested_clusters, strategies.eigengap) == pytest.approx((2, 1.2))
    assert strategies.connectivity == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_array_equal(strategies.cluster, groups)
    assert (strategies.k, strategies.neighbours, strategies.n_eigval, strategies.cap) == (5, 5, 8, 20000)


def test_analyse_class_above_the_cap():
    heatmaps, groups = planted_heatmaps(per_group=(30, 20, 14))
    features = heatmap_features(heatmaps)
    first = analyse_class(features, cap=40, seed=7)
    assert first.sampled.sum() == 40 and first.eigenvalues.size == 32
    assert first.suggested_clusters == 3
    # every image has a cluster; far-apart groups are recovered, the unsampled ones by their centroid
    assert adjusted_rand_score(groups, first.cluster) == 1.0
    assert np.isnan(first.x[~first.sampled]).all() and np.isfinite(first.x[first.sampled]).all()
    again = analyse_class(features, cap=40, seed=7)
    for field in ("cluster", "sampled", "x", "y", "eigenvalues"):
        np.testing.assert_array_equal(getattr(again, field), getattr(first, field))
    other = analyse_class(features, cap=40, seed=8)
    assert other.sampled.sum() == 40 and (other.sampled != first.sampled).any()


def test_analyse_class_degenerate_classes():
    empty = analyse_class(np.zeros((0, 4)))
    assert empty.cluster.shape == empty.x.shape == empty.sampled.shape == (0,) and empty.eigenvalues.size == 0
    assert empty.suggested_clusters == 0 and math.isnan(empty.eigengap) and math.isnan(empty.connectivity)

    one = analyse_class(np.ones((1, 4)))
    assert one.cluster.tolist() == [0] and (one.x[0], one.y[0]) == (0, 0) and one.neighbours == 0
    assert one.suggested_clusters == 1 and one.eigenvalues.tolist() == [1.0] and math.isnan(one.connectivity)

    two = analyse_class(np.eye(2, 4))
    assert two.cluster.tolist() == [0, 0] and two.neighbours == 1 and two.suggested_clusters == 1
    np.testing.assert_allclose(two.eigenvalues, [0.0, 2.0], atol=1e-12)
    assert two.connectivity == pytest.approx(2.0)

    # 5 images, k = 10: a complete graph, eigenvalues 0 and 5/4 (four times), one cluster
    few = analyse_class(np.random.default_rng(0).normal(size=(5, 4)), k=10)
    assert few.neighbours == 4 and few.suggested_clusters == 1 and math.isnan(few.eigengap)
    np.testing.assert_allclose(few.eigenvalues, [0, 1.25, 1.25, 1.25, 1.25], atol=1e-12)
    assert not few.cluster.any() and np.isfinite(few.x).all()

    # k + 2 images: the first class size whose graph is not complete, so a real eigengap
    just = analyse_class(np.random.default_rng(0).normal(size=(12, 4)), k=10)
    assert just.suggested_clusters >= 2 and np.isfinite(just.eigengap)
    assert set(just.cluster) == set(range(just.suggested_clusters))


def test_bad_features_are_named():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        analyse_class(np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        spectrum(np.array([[0.0, np.nan], [1.0, 2.0]]))


def test_spray_loads_without_torch_or_ray():
    code = ("import sys; import lrpscale.results.spray; "
            "print(sorted(m for m in ('torch', 'torchvision', 'matplotlib', 'ray') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
