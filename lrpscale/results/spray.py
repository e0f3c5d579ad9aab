"""Spectral relevance analysis (SpRAy, Lapuschkin et al. 2019): the prediction strategies of one
class, found as clusters of its images' relevance maps (docs/method.md §18).

The spectral core follows CoRelAy 1.0's SpRAy pipeline (Euclidean distances, a k-nearest-neighbour
affinity averaged with its transpose, D^-1/2 A D^-1/2, its largest eigenvalues reported as
Laplacian eigenvalues 1 - lambda); the eigengap rule, the clustering and the sampling above a cap
are ours, stated in §18. numpy, scipy and scikit-learn only, so the results wing loads without torch.

    features = heatmap_features(heatmaps)          # (N, S, S) stored heatmaps of one class
    strategies = analyse_class(features, seed=0)
    strategies.suggested_clusters, strategies.cluster
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg
from scipy.spatial.distance import cdist
from sklearn.cluster import KMeans
from sklearn.manifold import TSNE

DENSE_EIGEN_LIMIT = 1024  # up to this many images a dense eigendecomposition is both exact and faster than ARPACK
KMEANS_RESTARTS = 10  # k-means initialisations; the best (lowest inertia) is kept
TSNE_PERPLEXITY = 30.0  # scikit-learn's default, lowered for classes too small to support it
_DISTANCE_BLOCK = 2**23  # entries of one block of the (rows, N) distance matrix: 64 MB of float64
_NEAR_TIE = 1e-9  # relative slack within which Gram-form distances are re-ranked by exact differences


@dataclass(frozen=True)
class Spectrum:
    """The spectrum of one class's k-nearest-neighbour graph.

    eigenvalues: (E,) float64 Laplacian eigenvalues 1 - lambda, ascending, E = min(n_eigval, N);
    eigenvectors: (N, E) float64, column e belongs to eigenvalue e (unit columns, sign arbitrary);
    neighbours: the k actually used, min(k, N - 1).
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    neighbours: int


@dataclass(frozen=True)
class ClassStrategies:
    """SpRAy of one class: per image (N,) arrays, per class the spectrum's summary and the settings.

    cluster: int64 strategy of each image, 0 the largest; x, y: float64 t-SNE position (NaN for
    an image outside the sample); sampled: bool, whether the image took part in the spectral
    clustering (all True when N <= cap). eigenvalues: (E,) ascending Laplacian eigenvalues of the
    (sampled) class; suggested_clusters and eigengap from ``suggested_clusters`` (1 and NaN when
    the graph is complete); connectivity: the second-smallest eigenvalue (NaN when E < 2).
    """

    cluster: np.ndarray
    x: np.ndarray
    y: np.ndarray
    sampled: np.ndarray
    eigenvalues: np.ndarray
    suggested_clusters: int
    eigengap: float
    connectivity: float
    k: int
    neighbours: int
    n_eigval: int
    max_clusters: int
    seed: int
    cap: int


def heatmap_features(heatmaps: np.ndarray, max_side: int = 32) -> np.ndarray:
    """(N, S, S) heatmaps (float16 or float32) -> (N, D) float64 features.

    Each map is sum-pooled over p x p blocks, p = ceil(S / max_side), after zero padding on the
    bottom and right to a multiple of p, so D = ceil(S / p)^2 <= max_side^2; the pooled map is
    flattened and divided by its sum of |values| (a zero map stays zero), so that images are
    compared by where their relevance lies, not by how much of it there is.
    """
    heatmaps = np.asarray(heatmaps)
    if heatmaps.ndim != 3:
        raise ValueError(f"heatmaps must have shape (N, S, S), got {heatmaps.shape}: pass one map per image, channels summed")
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    count, height, width = heatmaps.shape
    block = max(1, math.ceil(max(height, width) / max_side))
    rows, columns = math.ceil(height / block), math.ceil(width / block)
    # float64 before summing: float16 sums of a few hundred values lose digits or overflow
    padded = np.zeros((count, rows * block, columns * block), dtype=np.float64)
    padded[:, :height, :width] = heatmaps
    pooled = padded.reshape(count, rows, block, columns, block).sum(axis=(2, 4)).reshape(count, -1)
    return _unit_l1_rows(pooled, "heatmaps")


def channel_features(values: np.ndarray) -> np.ndarray:
    """(N, C) relevance per channel -> (N, C) float64, each row divided by its sum of |values|
    (a zero row stays zero)."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"channel relevances must have shape (N, C), got {values.shape}")
    return _unit_l1_rows(values.astype(np.float64), "channel relevances")


def knn_affinity(features: np.ndarray, k: int = 10) -> scipy.sparse.csr_array:
    """(N, D) features -> (N, N) sparse affinity of the k-nearest-neighbour graph.

    A[i, j] = 1 when j is one of the k = min(k, N - 1) nearest neighbours of i (Euclidean; i is
    never its own neighbour; equal distances go to the lower index), then (A + A^T) / 2: 1 for
    mutual neighbours, 1/2 when only one is the other's, 0 otherwise (CoRelAy's ``SparseKNN``).
    """
    features = _feature_matrix(features)
    count = len(features)
    neighbours = _nearest_neighbours(features, k)
    rows = np.repeat(np.arange(count), neighbours.shape[1])
    directed = scipy.sparse.csr_array((np.ones(rows.size), (rows, neighbours.ravel())), shape=(count, count))
    return ((directed + directed.T) / 2.0).tocsr()


def normalised_affinity(affinity) -> scipy.sparse.csr_array:
    """(N, N) sparse or dense affinity A -> D^-1/2 A D^-1/2 (sparse), D the diagonal of row sums.

    An isolated image (row sum 0) keeps a zero row and column instead of a division by zero; its
    Laplacian eigenvalue is then 1.
    """
    affinity = scipy.sparse.csr_array(affinity, dtype=np.float64)
    degree = np.asarray(affinity.sum(axis=1)).ravel()
    scale = np.zeros_like(degree)
    np.divide(1.0, np.sqrt(degree), out=scale, where=degree > 0)
    diagonal = scipy.sparse.diags_array(scale)
    return (diagonal @ affinity @ diagonal).tocsr()


def spectrum(features: np.ndarray, k: int = 10, n_eigval: int = 32, solver: str = "auto") -> Spectrum:
    """(N, D) features -> the E = min(n_eigval, N) smallest Laplacian eigenvalues 1 - lambda
    (ascending) of the normalised k-nearest-neighbour affinity, lambda its E largest eigenvalues,
    and their eigenvectors, the spectral embedding.

    solver: "dense" (LAPACK), "sparse" (ARPACK, needs E < N) or "auto" (dense up to
    ``DENSE_EIGEN_LIMIT`` images or when E >= N - 1, else sparse).
    """
    if solver not in ("auto", "dense", "sparse"):
        raise ValueError(f"solver must be 'auto', 'dense' or 'sparse', got {solver!r}")
    if n_eigval < 1:
        raise ValueError(f"n_eigval must be at least 1, got {n_eigval}")
    features = _feature_matrix(features)
    count = len(features)
    neighbours = min(k, max(count - 1, 0))
    wanted = min(n_eigval, count)
    if wanted == 0:
        return Spectrum(np.zeros(0), np.zeros((0, 0)), neighbours)
    matrix = normalised_affinity(knn_affinity(features, k))
    dense = solver == "dense" or (solver == "auto" and (count <= DENSE_EIGEN_LIMIT or wanted >= count - 1))
    if dense:
        values, vectors = scipy.linalg.eigh(matrix.toarray(), subset_by_index=[count - wanted, count - 1])
    else:
        if wanted >= count:
            raise ValueError(f"the sparse solver needs n_eigval < N, got {wanted} of {count} images: use solver='dense'")
        # a fixed start vector: ARPACK's default is random, and re-runs should give the same eigenvectors
        start = np.random.default_rng(0).uniform(-1.0, 1.0, count)
        # largest algebraic, not CoRelAy's largest magnitude: the smallest Laplacian eigenvalues are wanted
        values, vectors = scipy.sparse.linalg.eigsh(matrix, k=wanted, which="LA", v0=start)
    order = np.argsort(-values, kind="stable")
    return Spectrum(1.0 - values[order], vectors[:, order], neighbours)


def suggested_clusters(laplacian_eigenvalues: np.ndarray, max_clusters: int = 10) -> tuple[int, float]:
    """The number of clusters at the largest eigengap, and that gap.

    With ascending eigenvalues l_1 <= l_2 <= ..., the gap after l_c is g_c = l_{c+1} - l_c; the
    count is the c in 2 .. min(max_clusters, E - 1) with the largest g_c (the smaller c on ties),
    so at least 2 clusters are suggested and splitting one class is always on the table. With
    fewer than 3 eigenvalues there is no such gap: (1, NaN) for E = 1 or 2, (0, NaN) for E = 0.
    """
    eigenvalues = np.asarray(laplacian_eigenvalues, dtype=np.float64)
    last = min(max_clusters, eigenvalues.size - 1)
    if last < 2:
        return min(eigenvalues.size, 1), math.nan
    gaps = np.diff(eigenvalues[:last + 1])[1:]  # g_2 .. g_last
    best = int(np.argmax(gaps))
    return best + 2, float(gaps[best])


def cluster(embedding: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """(N, E) spectral embedding (columns in ascending eigenvalue order) -> (N,) int64 labels.

    k-means (``KMEANS_RESTARTS`` seeded initialisations) on the first n_clusters columns, each row
    divided by its L2 norm (Ng, Jordan and Weiss; a zero row stays zero). Labels are renumbered
    by cluster size, 0 the largest (ties: the cluster of the lower first image), because k-means
    numbers its clusters arbitrarily.
    """
    embedding = np.asarray(embedding, dtype=np.float64)
    count = len(embedding)
    if n_clusters < 1 or n_clusters > max(count, 1):
        raise ValueError(f"n_clusters must be between 1 and the number of images ({count}), got {n_clusters}")
    if n_clusters == 1 or count == 0:
        return np.zeros(count, dtype=np.int64)
    if embedding.ndim != 2 or embedding.shape[1] < n_clusters:
        raise ValueError(f"the embedding needs at least n_clusters = {n_clusters} columns, got shape {embedding.shape}")
    leading = embedding[:, :n_clusters]
    norms = np.linalg.norm(leading, axis=1, keepdims=True)
    rows = np.divide(leading, norms, out=np.zeros_like(leading), where=norms > 0)
    labels = KMeans(n_clusters=n_clusters, n_init=KMEANS_RESTARTS, random_state=seed).fit_predict(rows)
    return _by_size(labels)


def embed_2d(features: np.ndarray, seed: int) -> np.ndarray:
    """(N, D) features -> (N, 2) float64 t-SNE layout (scikit-learn, PCA start, seeded).

    Perplexity min(30, max(1, (N - 1) / 3)), so that small classes still embed. t-SNE needs
    three points: one image sits at the origin, two at (-1, 0) and (1, 0).
    """
    features = _feature_matrix(features)
    count = len(features)
    if count < 3:
        return np.array([[-1.0, 0.0], [1.0, 0.0]])[:count] if count == 2 else np.zeros((count, 2))
    perplexity = min(TSNE_PERPLEXITY, max(1.0, (count - 1) / 3))
    # a PCA start is deterministic and keeps the global layout; it needs two feature columns
    start = "pca" if features.shape[1] >= 2 else "random"
    layout = TSNE(n_components=2, perplexity=perplexity, init=start, random_state=seed).fit_transform(features)
    return layout.astype(np.float64)


def analyse_class(features: np.ndarray, k: int = 10, n_eigval: int = 32, max_clusters: int = 10, seed: int = 0,
                  cap: int = 20000) -> ClassStrategies:
    """(N, D) features of one class -> its prediction strategies.

    Above ``cap`` images a seeded sample of ``cap`` is analysed, every other image joins the
    cluster with the nearest centroid (mean feature vector of the cluster's sampled images,
    Euclidean) and gets no t-SNE position (NaN). When every image is every other's neighbour
    (N <= k + 1) the graph is complete, its spectrum says nothing about groups, and the class is
    one cluster.
    """
    if cap < 1:
        raise ValueError(f"cap must be at least 1, got {cap}")
    features = _feature_matrix(features)
    count = len(features)
    sampled = np.ones(count, dtype=bool)
    if count > cap:
        sampled[:] = False
        sampled[np.random.default_rng(seed).choice(count, size=cap, replace=False)] = True
    sample = features[sampled]
    class_spectrum = spectrum(sample, k=k, n_eigval=n_eigval)
    eigenvalues = class_spectrum.eigenvalues
    if len(sample) <= k + 1:
        clusters, eigengap = min(len(sample), 1), math.nan
    else:
        clusters, eigengap = suggested_clusters(eigenvalues, max_clusters)
    labels = np.zeros(count, dtype=np.int64)
    labels[sampled] = cluster(class_spectrum.eigenvectors, max(clusters, 1), seed)
    positions = np.full((count, 2), np.nan)
    positions[sampled] = embed_2d(sample, seed)
    if not sampled.all():
        # k-means may leave a cluster empty on duplicate points: centroids of the labels it used
        found = labels[sampled].max() + 1
        centroids = np.stack([sample[labels[sampled] == label].mean(axis=0) for label in range(found)])
        labels[~sampled] = cdist(features[~sampled], centroids).argmin(axis=1)
    return ClassStrategies(
        cluster=labels, x=positions[:, 0], y=positions[:, 1], sampled=sampled, eigenvalues=eigenvalues,
        suggested_clusters=int(clusters), eigengap=eigengap,
        connectivity=float(eigenvalues[1]) if eigenvalues.size >= 2 else math.nan,
        k=k, neighbours=class_spectrum.neighbours, n_eigval=n_eigval, max_clusters=max_clusters, seed=seed, cap=cap)


def _feature_matrix(features: np.ndarray) -> np.ndarray:
    """(N, D) float64, C-contiguous; rejects other shapes and non-finite values, which would
    silently scramble every distance."""
    features = np.ascontiguousarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {features.shape}: use heatmap_features or channel_features")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinity: drop the images whose stored heatmaps are not finite")
    return features


def _unit_l1_rows(values: np.ndarray, what: str) -> np.ndarray:
    """(N, D) float64 rows divided by their sum of |values|; zero rows stay zero."""
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contain NaN or infinity: drop those images first")
    totals = np.abs(values).sum(axis=1, keepdims=True)
    return np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)


def _nearest_neighbours(features: np.ndarray, k: int) -> np.ndarray:
    """(N, D) float64 features -> (N, min(k, N - 1)) int64 indices of each row's nearest other
    rows, nearest first, equal distances to the lower index.

    Distances come in blocks of rows from the Gram form |a|^2 + |b|^2 - 2 a.b (one matrix product,
    no (N, N, D) difference array); candidates within a relative 1e-9 of the k-th are then ranked by
    exact differences, so near-ties are ordered as scipy's pdist orders them.
    """
    count = len(features)
    neighbours = min(k, max(count - 1, 0))
    result = np.zeros((count, neighbours), dtype=np.int64)
    if neighbours == 0:
        return result
    squared_norms = np.einsum("ij,ij->i", features, features)
    largest_norm = squared_norms.max()
    block_rows = max(1, _DISTANCE_BLOCK // count)
    for start in range(0, count, block_rows):
        stop = min(start + block_rows, count)
        squared = squared_norms[start:stop, None] + squared_norms[None, :] - 2.0 * (features[start:stop] @ features.T)
        squared[np.arange(stop - start), np.arange(start, stop)] = np.inf  # an image is not its own neighbour
        kth = np.partition(squared, neighbours - 1, axis=1)[:, neighbours - 1]
        slack = _NEAR_TIE * (squared_norms[start:stop] + largest_norm) + np.finfo(np.float64).tiny
        for offset, row in enumerate(range(start, stop)):
            candidates = np.flatnonzero(squared[offset] <= kth[offset] + slack[offset])
            exact = np.square(features[candidates] - features[row]).sum(axis=1)
            result[row] = candidates[np.lexsort((candidates, exact))[:neighbours]]
    return result


def _by_size(labels: np.ndarray) -> np.ndarray:
    """(N,) cluster labels -> the same partition numbered by size, 0 the largest (ties: the
    cluster whose first image comes first)."""
    found, first, sizes = np.unique(labels, return_index=True, return_counts=True)
    order = np.lexsort((first, -sizes))
    renumbered = np.empty(found.size, dtype=np.int64)
    renumbered[order] = np.arange(found.size)
    return renumbered[np.searchsorted(found, labels)]
