"""The critical-path graph as data: the name of the output node, how a class is labelled, and
the networkx DiGraph built from node and edge records. The engine produces the records, the results and the report read
them back from Parquet; this module needs only networkx, so all of them can share it.
"""
from __future__ import annotations

from collections.abc import Sequence

import networkx as nx

OUTPUT = "output"  # the layer name of the explained class's node


def path_graph(nodes: Sequence[dict], edges: Sequence[dict]) -> nx.DiGraph:
    """A networkx DiGraph from node and edge records (as ``critical_path`` or the Parquet tables give).

    Nodes are (layer, neuron) tuples with attributes relevance, activation, rank and layer;
    edges point from the lower neuron to the upper one, with attribute ``relevance``.
    """
    graph = nx.DiGraph()
    for node in nodes:
        graph.add_node((node["layer"], int(node["neuron"])), **{k: v for k, v in node.items() if k != "neuron"})
    for edge in edges:
        graph.add_edge((edge["layer_from"], int(edge["neuron_from"])), (edge["layer_to"], int(edge["neuron_to"])),
                       relevance=float(edge["relevance"]))
    return graph


def class_label(index: int, class_names: Sequence[str] | None = None) -> str:
    """``"name (index)"`` when the class has a name, ``"name"`` when the name is the index (digits),
    else ``"class index"``."""
    if class_names is not None and 0 <= index < len(class_names):
        name = str(class_names[index])
        return name if name == str(index) else f"{name} ({index})"
    return f"class {index}"

