"""The language-model path on a GPU worker (issue 21): the per-step memory and time of LoRA
fine-tuning and of the per-sample adapter gradients the estimators need, measured on a
Llama-shaped model, next to the on-paper estimate of ``docs/lm-gpu.md``; and the lm flow itself
(``examples/lm.yaml``) end to end with a larger base.

Three parts (``--parts``, default all):

- ``estimate``: the closed-form memory and FLOP estimate (no torch), for the ``--shape`` and the
  8B reference; ``python benchmarks/gpu_lm.py --parts estimate --shape llama-8b`` prints the table of
  ``docs/lm-gpu.md``.
- ``step``: a randomly initialised Llama-shaped ``transformers`` model (weights do not change
  memory or time) in bf16 on the device with peft LoRA adapters (rank ``--rank`` on
  ``--targets``), the family's loss (mean NLL of the last ``--response`` tokens; the vocabulary
  projection only on those positions, as ``cleanse.families.lm.model.LmScorer`` does): seconds per
  Adam step on the adapters and the peak device memory; then per-sample adapter gradients (one
  backward per sample, what TracIn / TRAK / influence featurise) and their Gaussian projection to
  ``--proj-dim`` dimensions, generated block by block from a seed (the ``(P, k)`` matrix of an 8B
  model's adapters is too large to hold), in seconds per sample.
- ``flow``: ``cleanse run`` of ``examples/lm.yaml`` (the library's ``run_all``) with a larger base
  (``--flow-set``), timed per stage. The lm family fine-tunes the adapters and scores on
  ``cleanse.models.architectures.default_device()`` (CUDA when present: ``LmFamily.fit``,
  ``scoring_context`` and the context's refits take the device); the base's pretraining and the
  outcome measurements stay on the CPU. The JSON records the device each part ran on.

    python benchmarks/gpu_lm.py --dry-run            # CPU, tiny shape and data: every part runs (about a minute)
    python benchmarks/gpu_lm.py --shape llama-8b --parts estimate step   # on a GPU worker (the device part)
    python benchmarks/gpu_lm.py --shape llama-8b     # all three (the flow part: minutes)
    python benchmarks/gpu_lm.py --parts estimate --shape llama-8b   # the docs table, no torch

Writes ``--out`` (default ``$OUT/gpu_lm.json`` when ``$OUT`` is set, else ``gpu_lm.json`` here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, fmt, md_table  # noqa: E402

GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: GQA attention, SwiGLU MLP, RMSNorm, untied or tied vocabulary head."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """``(d_in, d_out)`` of each linear layer of one block, by its ``transformers`` name."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def n_params(self) -> int:
        block = sum(a * b for a, b in self.module_dims().values()) + 2 * self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * block + self.hidden

    def n_matmul_params(self) -> int:
        """Parameters that take part in a matrix product per token (not the embedding lookup)."""
        return self.n_params() - self.vocab * self.hidden * (0 if self.tied else 1) - (2 * self.layers + 1) * self.hidden


SHAPES = {
    "tiny": Shape(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=512),
    "llama-1b": Shape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tied=True),
    "llama-8b": Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def n_adapter_params(shape: Shape, rank: int, targets: list[str]) -> int:
    """LoRA adds ``A`` ``(rank, d_in)`` and ``B`` ``(d_out, rank)`` to each targeted layer of each block."""
    dims = shape.module_dims()
    unknown = sorted(set(targets) - set(dims))
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; a Llama block has {sorted(dims)}")
    return shape.layers * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)


def estimate(shape: Shape, *, rank: int, targets: list[str], batch: int, seq: int, response: int, proj_dim: int,
             checkpointing: bool, peak_tflops: float, mfu: float) -> dict[str, float]:
    """Memory (GiB) and time (s) of one LoRA step and of one sample's projected adapter gradient.

    Assumptions (estimates, see ``docs/lm-gpu.md``): bf16 weights and activations; fp32 adapters
    with fp32 gradients and Adam moments (16 B per adapter parameter); flash attention (no
    ``seq^2`` term); frozen linear layers keep no input for a weight gradient, so a block keeps per
    token its two norm inputs, the LoRA input, q, k, v, the attention output, the MLP gate and up
    outputs and the SwiGLU product (``6 h + 2 kv + 3 i`` values), or only its input with activation
    checkpointing (plus one block recomputed); the vocabulary projection on the response tokens only
    (bf16 logits and an fp32 log-softmax). FLOPs: forward ``2 N T`` plus attention ``4 s h`` per token
    and block; the backward computes input gradients only (``2 N T``, the adapters' weight
    gradients are ``O(r)``), and checkpointing adds one more forward. Time = FLOPs / (peak x MFU).
    """
    h, i, kv, layers = shape.hidden, shape.intermediate, shape.kv_dim, shape.layers
    tokens = batch * seq
    adapters = n_adapter_params(shape, rank, targets)
    per_token_block = h if checkpointing else 6 * h + 2 * kv + 3 * i
    activations = 2 * tokens * (layers * per_token_block + (6 * h + 2 * kv + 3 * i if checkpointing else 0))
    logits = batch * response * shape.vocab * (2 + 4)
    matmul = 2 * shape.n_matmul_params() - 2 * shape.vocab * h * (seq - response) / seq  # head on responses only
    attention = 4 * seq * h * layers
    forward = tokens * (matmul + attention)
    step_flops = forward * (3 if checkpointing else 2)
    rate = peak_tflops * 1e12 * mfu
    sample_flops = step_flops / batch
    return {
        "params_billion": shape.n_params() / 1e9,
        "weights_gib": 2 * shape.n_params() / GIB,
        "adapter_params_million": adapters / 1e6,
        "adapter_state_gib": 16 * adapters / GIB,
        "activations_gib": activations / GIB,
        "logits_gib": logits / GIB,
        "step_memory_gib": (2 * shape.n_params() + 16 * adapters + activations + logits) / GIB,
        "step_tflop": step_flops / 1e12,
        "step_seconds": step_flops / rate,
        "sample_grad_seconds": sample_flops / rate,
        "projection_gflop_per_sample": 2 * adapters * proj_dim / 1e9,
        "projection_matrix_gib": 2 * adapters * proj_dim / GIB,
        "projected_store_mib_per_1k_samples": 1000 * proj_dim * 2 / 1024**2,
    }


def estimate_table(shape_name: str, args: Any) -> str:
    shape = SHAPES[shape_name]
    rows = []
    for checkpointing in (False, True):
        e = estimate(shape, rank=args.rank, targets=args.targets, batch=args.batch, seq=args.seq,
                     response=args.response, proj_dim=args.proj_dim, checkpointing=checkpointing,
                     peak_tflops=args.peak_tflops, mfu=args.mfu)
        rows.append(["on" if checkpointing else "off", fmt(e["weights_gib"], 1), fmt(e["adapter_state_gib"], 2),
                     fmt(e["activations_gib"], 1), fmt(e["logits_gib"], 2), fmt(e["step_memory_gib"], 1),
                     fmt(e["step_tflop"], 0), fmt(e["step_seconds"], 2), fmt(1000 * e["sample_grad_seconds"], 0)])
    head = estimate(shape, rank=args.rank, targets=args.targets, batch=args.batch, seq=args.seq, response=args.response,
                    proj_dim=args.proj_dim, checkpointing=False, peak_tflops=args.peak_tflops, mfu=args.mfu)
    return "\n".join([
        f"{shape_name}: {fmt(head['params_billion'], 2)} B parameters; LoRA rank {args.rank} on {', '.join(args.targets)}: "
        f"{fmt(head['adapter_params_million'], 1)} M adapter parameters; batch {args.batch} x {args.seq} tokens, loss on the "
        f"last {args.response}; {args.peak_tflops:g} TFLOP/s peak at {args.mfu:.0%} MFU (estimates).", "",
        md_table(["checkpointing", "weights GiB", "adapters+Adam GiB", "activations GiB", "logits GiB", "total GiB",
                  "TFLOP/step", "s/step", "ms per sample gradient"], rows), "",
        f"Projection to k = {args.proj_dim}: {fmt(head['projection_gflop_per_sample'], 0)} GFLOP per sample; the dense "
        f"(P, k) matrix would take {fmt(head['projection_matrix_gib'], 0)} GiB in bf16 (generated block by block instead); "
        f"projected features {fmt(head['projected_store_mib_per_1k_samples'], 1)} MiB per 1,000 samples."])


# ----------------------------------------------------------------------------- measured on the device


def _device_peak(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    from _common import proc_status_mb

    return proc_status_mb().get("VmHWM", float("nan")) / 1024


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: Shape, rank: int, targets: list[str], device: Any, dtype: Any) -> Any:
    """A random Llama-shaped causal LM in ``dtype`` on ``device`` with fp32 LoRA adapters (peft)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab, tie_word_embeddings=shape.tied,
                         max_position_embeddings=4096)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            base = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0))
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()
    return model


def response_nll(model: Any, ids: Any, response: int) -> Any:
    """Mean NLL of the last ``response`` tokens of each row, ``(B,)``; the head sees those positions only."""
    import torch

    inner = model.get_base_model()
    hidden = inner.model(input_ids=ids).last_hidden_state[:, -response - 1 : -1]
    logp = torch.log_softmax(inner.lm_head(hidden).float(), dim=-1)
    return -logp.gather(-1, ids[:, -response:, None])[..., 0].mean(1)


def measure_step(shape: Shape, args: Any, device: Any) -> dict[str, Any]:
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    model = build_model(shape, args.rank, args.targets, device, dtype)
    build_seconds = time.perf_counter() - began
    if args.checkpointing:
        model.get_base_model().gradient_checkpointing_enable()
        model.get_base_model().enable_input_require_grads()
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(adapters, lr=1e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, shape.vocab, (args.batch, args.seq), device=device, generator=generator)
    model.train()
    times = []
    for step in range(args.steps + 1):  # step 0 warms up (kernels, allocator)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = response_nll(model, ids, args.response).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        if step:
            times.append(time.perf_counter() - start)
    step_peak = _device_peak(device)
    # per-sample adapter gradients, one backward each, then a blockwise Gaussian projection
    samples = ids[: args.samples] if args.samples <= args.batch else torch.randint(
        0, shape.vocab, (args.samples, args.seq), device=device, generator=generator)
    flat = torch.empty(args.samples, sum(p.numel() for p in adapters), device=device, dtype=torch.float32)
    _sync(device)
    start = time.perf_counter()
    for row in range(args.samples):
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            nll = response_nll(model, samples[row : row + 1], args.response).sum()
        grads = torch.autograd.grad(nll, adapters)
        flat[row] = torch.cat([g.reshape(-1).float() for g in grads])
    _sync(device)
    grad_seconds = (time.perf_counter() - start) / args.samples
    start = time.perf_counter()
    projected = project_blockwise(flat, args.proj_dim, seed=0, block=args.proj_block)
    _sync(device)
    projection_seconds = (time.perf_counter() - start) / args.samples
    return {"device": str(device), "dtype": str(dtype), "build_seconds": build_seconds,
            "n_params": sum(p.numel() for p in model.parameters()), "n_adapter_params": flat.shape[1],
            "step_seconds": sorted(times)[len(times) // 2], "step_seconds_all": times, "step_peak_gib": step_peak,
            "sample_grad_seconds": grad_seconds, "projection_seconds_per_sample": projection_seconds,
            "projected_shape": list(projected.shape), "peak_gib": _device_peak(device), "loss": float(loss)}


def project_blockwise(flat: Any, k: int, *, seed: int, block: int) -> Any:
    """``flat @ P / sqrt(k)`` ``(n, k)`` for a Gaussian ``P`` ``(p, k)`` generated ``block`` rows at a
    time from ``seed`` (the same ``P`` for every call with that seed, never held whole)."""
    import torch

    out = torch.zeros(flat.shape[0], k, device=flat.device, dtype=torch.float32)
    generator = torch.Generator(device=flat.device)
    for index, start in enumerate(range(0, flat.shape[1], block)):
        rows = flat[:, start : start + block]
        generator.manual_seed(seed * 1_000_003 + index)
        piece = torch.randn(rows.shape[1], k, device=flat.device, dtype=torch.float32, generator=generator)
        out += rows @ piece
    return out / k**0.5


def run_flow(overrides: list[str], work: Path) -> dict[str, Any]:
    """``cleanse run`` of ``examples/lm.yaml`` with ``overrides``, timed per stage from its log."""
    from cleanse.config import load_params
    from cleanse.stages.runner import run_all
    from cleanse.storage import Layout

    params = load_params(REPO / "examples" / "lm.yaml", ["tracking.enabled=false", *overrides])
    stamps: list[tuple[float, str]] = []
    started = time.perf_counter()
    metrics = run_all(params, Layout.at(work), log=lambda line: stamps.append((time.perf_counter() - started, line)))
    from cleanse.models.architectures import default_device

    return {"overrides": overrides, "device": str(default_device()), "wall_seconds": time.perf_counter() - started, "log": [[round(t, 1), line] for t, line in stamps],
            "steer_rate": {key: metrics[key]["steer_rate"] for key in ("baseline", "random", "oracle")},
            "estimators": {name: {"average_precision": entry["detection"]["average_precision"],
                                  "steer_rate": entry["retrain"]["steer_rate"]}
                           for name, entry in metrics["estimators"].items()}}


# A larger base than examples/lm.yaml's 2 x 64 (about 10x the parameters, 4x the data) for the worker.
FLOW_LARGER = ["model.base.n_layer=4", "model.base.n_embd=256", "model.base.n_head=4", "data.n_train=1600",
               "model.lora.rank=8", "scorers.trak.n_models=2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["estimate", "step", "flow"], default=["estimate", "step", "flow"])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shape and data (checks every part runs)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", nargs="+", default=ATTENTION)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--response", type=int, default=64, help="loss on the last this many tokens")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--samples", type=int, default=16, help="per-sample gradients measured")
    parser.add_argument("--proj-dim", type=int, default=4096)
    parser.add_argument("--proj-block", type=int, default=1 << 16)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the step part")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device (H100/H200 SXM)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation for the estimate")
    parser.add_argument("--flow-set", nargs="*", default=None, help="overrides of the flow part (default: a larger base)")
    out_default = Path(os.environ["OUT"]) / "gpu_lm.json" if os.environ.get("OUT") else Path("gpu_lm.json")
    parser.add_argument("--out", type=Path, default=out_default)
    args = parser.parse_args()
    if args.dry_run:
        args.shape, args.batch, args.seq, args.response, args.steps = "tiny", 2, 32, 4, 2
        args.samples, args.proj_dim, args.proj_block, args.rank = 3, 64, 1000, 4
    if args.response >= args.seq:
        raise SystemExit(f"gpu_lm: --response ({args.response}) must be shorter than --seq ({args.seq})")
    result: dict[str, Any] = {"shape": args.shape, "dims": asdict(SHAPES[args.shape]), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if "estimate" in args.parts:
        result["estimate"] = {name: estimate(SHAPES[name], rank=args.rank, targets=args.targets, batch=args.batch,
                                             seq=args.seq, response=args.response, proj_dim=args.proj_dim,
                                             checkpointing=args.checkpointing, peak_tflops=args.peak_tflops,
                                             mfu=args.mfu) for name in sorted({args.shape, "llama-8b"})}
        print(estimate_table(args.shape, args))
    if "step" in args.parts or "flow" in args.parts:
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
        result["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if "step" in args.parts:
            result["step"] = measure_step(SHAPES[args.shape], args, device)
            print(json.dumps({k: v for k, v in result["step"].items() if k != "step_seconds_all"}, indent=1), flush=True)
        if "flow" in args.parts:
            import tempfile

            from lm import SMOKE

            overrides = args.flow_set if args.flow_set is not None else (SMOKE if args.dry_run else FLOW_LARGER)
            with tempfile.TemporaryDirectory(prefix="gpu_lm_") as work:
                if args.dry_run:
                    overrides = [*overrides, f"model.base.cache_dir={Path(work) / 'lm-cache'}"]
                result["flow"] = {"device": "cpu (the lm family fits and scores on the CPU)",
                                  **run_flow(list(overrides), Path(work) / "run")}
            print(json.dumps({k: v for k, v in result["flow"].items() if k != "log"}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
