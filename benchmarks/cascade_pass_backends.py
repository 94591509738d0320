"""One-shot selection's CPU time with the MONSTOR pass's two backends (numba kernel, numpy calls), in one
process, alternating calls so that both see the same load: the whole one-shot as the benchmark times it
(neighbourhood search and the pass's gradient at x = 1, both in that backend, scatter to (E,), top-b), b = 5 % of the edges, on
power_grid, jazz and email_eu_core, and the 1M-edge Barabasi-Albert scale case (b = 1 %, as ``--scale``).
An untrained surrogate (its weights do not change the cost), 5 degree seeds, one thread. Also the numba
kernel's one-off cost in this process (compile, or load from numba's cache), the largest difference of
the two backends' scores (relative to the largest score) and the edges one cuts and the other does not,
with their largest distance from the b-th score (relative: ties split by float rounding are about 1e-8).

    python benchmarks/cascade_pass_backends.py --calls 300 --out /tmp/backends.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


def cases(scale: bool) -> list[tuple[str, Any, float]]:
    from cleanse.graphs.generators import barabasi_albert, cascade_graph

    graphs = [(name, cascade_graph(name, n=300, m=2), 0.05) for name in ("power_grid", "jazz", "email_eu_core")]
    return graphs + ([("ba_1M", barabasi_albert(170_000, 3, seed=0), 0.01)] if scale else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300, help="calls per backend and graph (medians of these)")
    parser.add_argument("--scale-calls", type=int, default=300, help="calls per backend on the 1M-edge graph")
    parser.add_argument("--no-scale", action="store_true", help="skip the 1M-edge graph")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the untrained surrogate's weights, so that ties at the b-th score repeat
    began = time.perf_counter()
    from cleanse.graphs import monstor_pass
    from cleanse.graphs import selection as sel
    from cleanse.graphs.generators import choose_seeds, edge_probabilities
    from cleanse.graphs.surrogate import SpreadSurrogate, SurrogateConfig

    imported = time.perf_counter() - began
    warm = monstor_pass.warm_kernel()  # the first surrogate built in a process pays this (0 when already warm)
    rows = []
    for name, g, fraction in cases(not args.no_scale):
        w = edge_probabilities(g, "weighted_cascade")
        seeds = choose_seeds(g, 5, "degree")
        model = SpreadSurrogate(g.edge_index, w, g.num_nodes, SurrogateConfig(kind="monstor")).eval()
        b = max(1, int(round(fraction * g.num_edges)))

        def scores(backend: str) -> np.ndarray:
            hood = model.neighbourhood(seeds, backend)
            grad = monstor_pass.MonstorPass.of(model, hood, backend).spread_and_gradient(np.ones(int(hood.edges.shape[0])))[1]
            return sel._whole(hood, grad)

        def oneshot(backend: str) -> np.ndarray:
            return sel.top_edges(scores(backend), b)

        score = {backend: scores(backend) for backend in monstor_pass.BACKENDS}  # also converts the MLP once
        picks = {backend: sel.top_edges(score[backend], b) for backend in monstor_pass.BACKENDS}
        # edges one backend cuts and the other does not: ties at the b-th score, split by float rounding?
        differ = np.setxor1d(picks["numba"], picks["numpy"])
        scale = float(np.abs(score["numpy"]).max())
        boundary = float(np.sort(score["numpy"])[::-1][b - 1])
        times: dict[str, list[float]] = {backend: [] for backend in monstor_pass.BACKENDS}
        calls = args.scale_calls if name == "ba_1M" else args.calls
        for _ in range(calls):
            for backend in monstor_pass.BACKENDS:
                t = time.process_time()
                oneshot(backend)
                times[backend].append(time.process_time() - t)
        median = {backend: 1e3 * float(np.median(values)) for backend, values in times.items()}
        row = {"graph": name, "nodes": g.num_nodes, "edges": g.num_edges, "b": b, "calls": calls,
               "numba_ms": median["numba"], "numpy_ms": median["numpy"],
               "numpy_over_numba": median["numpy"] / median["numba"],
               "max_score_difference": float(np.abs(score["numba"] - score["numpy"]).max()) / scale,
               "differing_edges": int(differ.size),
               "differing_off_boundary": float(np.abs(score["numpy"][differ] - boundary).max()) / scale if differ.size else 0.0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"kernel_warm_seconds": warm, "import_seconds": imported, "rows": rows,
              "load_average_end": os.getloadavg()[0]}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
