"""NN-Degree: the average node degree of each cell's channel-level graph, summed over cells.

Channel-level graph: one node per output channel of a conv (or linear) layer; a directed edge
from every channel a layer reads to every channel it writes (within a group, for grouped convs).
A cell's degree is the number of edges into the channels of its layers divided by the number of
those channels (the average in-degree). In a cell of the search space, layer 1 reads the entry's
``w`` channels and layer ``i >= 2`` reads ``w + t`` channels, so

    g_c = (d·w·w + (d − 1)·t·w) / (d·w) = w_c + t_c·(d_c − 1)/d_c,      NN-Degree = Σ_c g_c.

:func:`nn_degree` is that closed form (vectorised; it accepts relaxed, non-integer values).
:func:`channel_graph_degree` builds the graph explicitly from an ONNX model and counts it; the
tests check one against the other, and it maps zoo networks (ResNet, MobileNetV2: identity
skips through ``Add``) onto the metric. See docs/flash.md.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import onnx

from ..errors import UnsupportedOpError

#: Ops that keep every channel of their (first) input as it is.
CHANNEL_PRESERVING = frozenset({"BatchNormalization", "Relu", "Clip", "AveragePool", "MaxPool",
                                "GlobalAveragePool", "Flatten", "Identity", "Pad", "Sigmoid"})


def nn_degree(widths: np.ndarray, depths: np.ndarray, skips: np.ndarray) -> np.ndarray:
    """Σ_c w_c + t_c (d_c − 1) / d_c over the last axis (cells)."""
    widths, depths, skips = (np.asarray(v, float) for v in (widths, depths, skips))
    return (widths + skips * (depths - 1) / depths).sum(axis=-1)


def channel_graph_degree(proto: onnx.ModelProto,
                         cell_of: Callable[[onnx.NodeProto, tuple[int, ...]], object]
                         ) -> dict[object, float]:
    """Average in-degree per cell of the channel-level graph of ``proto``.

    ``cell_of(conv_node, output_shape)`` names the cell whose channels a Conv/Gemm node writes,
    or None for channels counted in no cell. A tensor is tracked as one set of graph nodes per
    channel: Conv and Gemm make new nodes, Concat and Split rearrange channels, ``Add`` merges
    the sets channel by channel (an identity skip adds an edge from the skipped channel to each
    channel that reads the sum), and channel-preserving ops pass them on."""
    shapes = _shapes(proto)
    image = proto.graph.input[0].name
    # the image's channels are nodes -1, -2, ...; layer channels are numbered from 0
    channels: dict[str, list[frozenset[int]]] = {
        image: [frozenset({-c - 1}) for c in range(shapes[image][1])]}
    edges: dict[object, set[tuple[int, int]]] = defaultdict(set)
    nodes: dict[object, int] = defaultdict(int)
    count = 0
    for node in proto.graph.node:
        op, ins = node.op_type, [channels.get(name) for name in node.input]
        if op in ("Conv", "Gemm"):
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            cout = shapes[node.output[0]][1]
            cell = cell_of(node, shapes[node.output[0]])
            per_in, per_out = len(ins[0]) // groups, cout // groups
            out = []
            for k in range(cout):
                source = ins[0][k // per_out * per_in:(k // per_out + 1) * per_in]
                if cell is not None:
                    nodes[cell] += 1
                    edges[cell].update((s, count) for channel in source for s in channel)
                out.append(frozenset({count}))
                count += 1
            channels[node.output[0]] = out
        elif op == "Concat":
            channels[node.output[0]] = [c for part in ins if part is not None for c in part]
        elif op == "Split":
            sizes = [shapes[name][1] for name in node.output]
            starts = np.cumsum([0] + sizes)
            for name, start, stop in zip(node.output, starts, starts[1:]):
                channels[name] = ins[0][start:stop]
        elif op == "Add":
            channels[node.output[0]] = [a | b for a, b in zip(ins[0], ins[1])]
        elif op in CHANNEL_PRESERVING or op in ("Constant", "Reshape"):
            if ins and ins[0] is not None:
                channels[node.output[0]] = ins[0]
        else:
            raise UnsupportedOpError(f"channel graph: op {op} (node '{node.name}') is not modelled")
    return {cell: len(edges[cell]) / nodes[cell] for cell in nodes}


def _shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    infos = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    return {info.name: tuple(d.dim_value for d in info.type.tensor_type.shape.dim)
            for info in infos}


_LAYER = re.compile(r"cells\.(\d+)\.layers\.")


def search_space_cell(node: onnx.NodeProto, shape: tuple[int, ...]) -> int | None:
    """Cell index of a layer conv in a search-space model (entries and head: None)."""
    match = _LAYER.search(node.name) or _LAYER.search(node.input[1])
    return int(match[1]) if match and node.op_type == "Conv" else None


def resolution_cell(node: onnx.NodeProto, shape: tuple[int, ...]) -> int | None:
    """For zoo networks: a cell is a stage, i.e. the convs of one output resolution."""
    return shape[2] if node.op_type == "Conv" else None
