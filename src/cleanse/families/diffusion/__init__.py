"""The diffusion family (issue 18): DMin attribution (Lin, Lao & Zhao, arXiv 2412.08637) of a
generated image to the training images of a diffusers DDPM, from compressed per-timestep gradient
signatures stored in an approximate nearest-neighbour index.

The library core, framework-free, with diffusers, peft and faiss imported lazily (the optional
``diffusion`` extra):

- :mod:`.timesteps`: the cube-law timesteps and the one fixed, shared noise;
- :mod:`.models`: a small ``UNet2DModel`` with its ``DDPMScheduler``, and peft LoRA adapters;
- :mod:`.train`: fitting it (the DDPM objective, Adam, seeded) and ancestral sampling;
- :mod:`.signatures`: per-sample, per-timestep L2-normalised gradients of the diffusion loss
  (``torch.func``: ``functional_call`` + ``vmap(grad)``);
- :mod:`.sketch`: DMin's compression (pad, permute, random signs, group sums) for several sizes;
- :mod:`.index`: the exact scan, the faiss HNSW inner-product index, and the resumable shard cache.
"""
