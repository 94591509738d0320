"""Graphs: node classification and influence estimation (issue 19; the ``graph`` family is not
wired into the pipeline yet).

- :mod:`cleanse.graphs.data`: the staged node-classification and influence graphs
  (``../shared/data``), symmetrised, with their published splits and DeepIM's Monte Carlo ground
  truth; a stochastic block model with a homophily knob.
- :mod:`cleanse.graphs.axelgnn`: the AxelGNN-style layer (Hevapathige, arXiv 2509.19084, as the
  spec reconstructs it), each ingredient switchable.
- :mod:`cleanse.graphs.baselines`: one builder for AxelGNN-style, GCN, GAT, GraphSAGE, GCNII,
  LINKX (torch-geometric, the ``graph`` extra) and an MLP.
- :mod:`cleanse.graphs.train`: full-batch training with early stopping; mean +- sd over splits.
- :mod:`cleanse.graphs.cascades`: batched IC / LT Monte Carlo, exact live-edge enumeration, and
  cynetdiff as the reference simulator.
"""
