"""One seed derivation: named streams that never collide within a run, and the recorded runs' closed forms."""

import pytest

from hyft.seeds import STREAMS, derive_seed


@pytest.mark.parametrize("root", [0, 1, 42, 2**31 - 1])
def test_streams_do_not_collide_for_world_sizes_up_to_1024(root):
    seeds = {("directions",): derive_seed(root, "directions"), ("sampler",): derive_seed(root, "sampler")}
    for rank in range(1024):
        seeds[("dropout", rank)] = derive_seed(root, "dropout", rank)
        for step in (0, 1, 1000):
            seeds[("dropout-resharded", rank, step)] = derive_seed(root, "dropout-resharded", rank, step)
    assert len(set(seeds.values())) == len(seeds)  # no two streams (or ranks, or resumes) share a seed
    assert all(0 <= s < 2**63 for s in seeds.values())


def test_shared_streams_are_the_same_on_every_rank_and_rank_streams_differ():
    assert derive_seed(3, "directions", rank=0) == derive_seed(3, "directions", rank=17)
    assert derive_seed(3, "sampler", rank=0) == derive_seed(3, "sampler", rank=5)
    assert derive_seed(3, "dropout", rank=1) != derive_seed(3, "dropout", rank=2)
    assert derive_seed(3, "dropout", rank=1) != derive_seed(4, "dropout", rank=1)


def test_recorded_runs_keep_their_streams():
    """The study's cells drew directions, minibatch order and one-process dropout from these forms."""
    assert derive_seed(7, "directions") == 7 * 1_000_003 + 17
    assert derive_seed(7, "sampler") == 7 * 7919 + 1
    assert derive_seed(7, "dropout", 0) == 7


def test_unknown_stream_is_refused():
    with pytest.raises(ValueError, match="unknown seed stream"):
        derive_seed(0, "masks")  # type: ignore[arg-type]
    assert set(STREAMS) >= {"directions", "sampler", "dropout"}
