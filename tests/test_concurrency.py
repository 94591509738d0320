"""Model initialisation under threads: Prefect's task runner trains and rebuilds models in
concurrent threads, and torch initialises parameters from one process-wide generator."""

from __future__ import annotations

import threading

import torch

from cleanse.models.architectures import build_model, spec_for
from cleanse.models.trainer import seeded_model


def test_seeded_initialisation_is_unmoved_by_concurrent_model_builds():
    spec = spec_for("mlp", [32, 16], (13,), 3)
    expected = [seeded_model(spec, seed).state_dict() for seed in range(20)]
    stop = threading.Event()

    def rebuild_forever() -> None:  # as TrainedModel.module() does in another branch
        while not stop.is_set():
            build_model(spec)

    others = [threading.Thread(target=rebuild_forever) for _ in range(2)]
    for thread in others:
        thread.start()
    try:
        got = [seeded_model(spec, seed).state_dict() for _ in range(5) for seed in range(20)]
    finally:
        stop.set()
        for thread in others:
            thread.join()
    for index, state in enumerate(got):
        reference = expected[index % 20]
        assert all(torch.equal(state[key], reference[key]) for key in reference), f"seed {index % 20} moved"


def test_building_a_model_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build_model(spec_for("mlp", [8], (4,), 2))
    assert torch.equal(torch.get_rng_state(), before)
