"""The maths of E-tree (hierarchical) learning as pure functions: no HTTP, no threads.

An E-tree has layers 1 (trainers) to L (the top). A node of layer l > 1 runs `sync`
rounds; in each it sends its model to its children (layer l - 1), waits for their
results and replaces its model by their average weighted by samples, where a child's
samples are all the training samples below it. After its `sync` rounds it hands its
model and its samples to its father. So the top's model is a *nested* weighted average:
`tree_average` computes it for known leaves, the way the nodes do (one `fedavg` per
aggregating node, children in the structure's order), so tests can compare exactly.
"""
from __future__ import annotations

import zlib
from typing import Any, Mapping, Sequence, Union

import torch

from dml_app.algorithms import StateDict, fedavg

# A tree for tree_average: a leaf is (state_dict, n_samples); an inner node is a list of trees.
Tree = Union[tuple, list]


def aggregate(results: Sequence[tuple[StateDict, int]]) -> tuple[dict[str, torch.Tensor], int]:
    """One aggregation of an E-tree node: (sample-weighted mean, total samples)."""
    model = fedavg(results)
    return model, sum(n for _, n in results)


def tree_average(tree: Tree) -> tuple[dict[str, torch.Tensor], int]:
    """The nested weighted average of a tree of (state_dict, n_samples) leaves.

    `[[(a, 10), (b, 30)], (c, 20)]` is the mean of (mean of a and b, 40 samples) and
    (c, 20 samples). Mathematically this equals the flat sample-weighted mean of the
    leaves; in float32 it equals what the nodes compute, level by level, to the bit.
    """
    if isinstance(tree, tuple):
        sd, n = tree
        if not isinstance(sd, Mapping):
            raise ValueError(f"tree_average: a leaf is (state_dict, n_samples), got {type(sd).__name__}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"tree_average: a leaf has n_samples={n!r}; expected an int >= 0")
        return dict(sd), n
    if not isinstance(tree, list) or not tree:
        raise ValueError("tree_average: an inner node is a non-empty list of subtrees, "
                         "e.g. [[(sd_a, 10), (sd_b, 30)], (sd_c, 20)]")
    return aggregate([tree_average(sub) for sub in tree])


def known_weights(template: Mapping[str, Any], name: str, seed: int, k: int) -> dict[str, torch.Tensor]:
    """Reproducible stand-in for a trainer's k-th training result (test knob).

    Every floating tensor of `template` is replaced by normal noise drawn from a
    generator seeded by (name, seed, k); other tensors are copied. A test computes the
    same tensors locally to know what each trainer sent.
    """
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{seed}/{k}".encode()))
    out = {}
    for key in sorted(template):
        t = template[key]
        if t.dtype.is_floating_point:
            out[key] = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
        else:
            out[key] = t.detach().clone()
    return out

