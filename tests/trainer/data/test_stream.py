"""The global sample stream: world-size independence, mixing, epochs, resumable state."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.data.stream import SampleStream

GLOBAL_BATCH = 12


def make_stream(weights=(0.75, 0.25), sizes=(500, 200), seed=0) -> SampleStream:
    names = [f"s{i}" for i in range(len(weights))]
    return SampleStream(names, list(sizes), list(weights), seed=seed, seq_len=8)


def step_ids(stream: SampleStream, dp_size: int) -> list[str]:
    """One global step as dp_size ranks see it: each rank's slice, concatenated in rank order.

    Every rank keeps its own stream copy in the trainer; here the ranks share the global batch
    and slice it exactly as Data.next_step_batches does."""
    refs = stream.take(GLOBAL_BATCH)
    per_rank = GLOBAL_BATCH // dp_size
    slices = [refs[r * per_rank : (r + 1) * per_rank] for r in range(dp_size)]
    return [stream.sample_id(ref) for rank_refs in slices for ref in rank_refs]


def run_ids(stream: SampleStream, steps: int, dp_size: int) -> list[list[str]]:
    return [step_ids(stream, dp_size) for _ in range(steps)]


def test_same_samples_for_every_dp_size():
    reference = run_ids(make_stream(), steps=30, dp_size=1)
    for dp_size in (2, 3):
        assert run_ids(make_stream(), steps=30, dp_size=dp_size) == reference
    assert len({sample for step in reference for sample in step}) == 30 * GLOBAL_BATCH


def test_state_round_trip_across_dp_sizes():
    uninterrupted = run_ids(make_stream(), steps=20, dp_size=1)
    first = make_stream()
    run_ids(first, steps=7, dp_size=2)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make_stream()
    resumed.load_state_dict(state)
    assert run_ids(resumed, steps=13, dp_size=3) == uninterrupted[7:]
    assert resumed.state_dict()["cursor"] == 20 * GLOBAL_BATCH


def test_seed_changes_order_but_not_mix():
    a, b = make_stream(seed=0).take(100), make_stream(seed=1).take(100)
    assert [r.index for r in a] != [r.index for r in b]
    assert [r.source for r in a] == [r.source for r in b]


def token_shares(stream: SampleStream) -> list[float]:
    tokens = stream.tokens_by_source
    return [count / sum(tokens.values()) for count in tokens.values()]


@pytest.mark.parametrize("weights", [(0.75, 0.25), (0.95, 0.05), (3.0, 1.0, 1.0)])
def test_token_shares_follow_weights(weights):
    stream = make_stream(weights, sizes=(300,) * len(weights))
    for _ in range(50):
        stream.take(GLOBAL_BATCH)
        shares = token_shares(stream)
        targets = [w / sum(weights) for w in weights]
        # Every prefix is within about one sample of the target.
        for delivered, target in zip(stream.delivered, targets):
            assert abs(delivered - target * stream.cursor) <= 1
    assert all(abs(s - t) < 0.01 for s, t in zip(shares, targets))


def test_mix_identical_after_resume():
    uninterrupted = make_stream((0.95, 0.05))
    uninterrupted.take(GLOBAL_BATCH * 40)
    resumed = make_stream((0.95, 0.05))
    resumed.take(GLOBAL_BATCH * 17)
    state = resumed.state_dict()
    resumed = make_stream((0.95, 0.05))
    resumed.load_state_dict(state)
    resumed.take(GLOBAL_BATCH * 23)
    assert resumed.tokens_by_source == uninterrupted.tokens_by_source
    assert resumed.state_dict() == uninterrupted.state_dict()


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=5),
    steps=st.integers(1, 30),
    resume_at=st.integers(0, 30),
)
def test_mixing_property(weights, steps, resume_at):
    sizes = [7 + 13 * i for i in range(len(weights))]  # small: epochs wrap
    stream = SampleStream([f"s{i}" for i in range(len(weights))], sizes, weights, 3, 4)
    reference = [stream.sample_id(r) for r in stream.take(steps * GLOBAL_BATCH)]
    targets = [w / sum(weights) for w in weights]
    for delivered, target in zip(stream.delivered, targets):
        assert abs(delivered - target * stream.cursor) <= 1 + 1e-9
    resume_at = min(resume_at, steps)
    first = SampleStream(stream.names, sizes, weights, 3, 4)
    first.take(resume_at * GLOBAL_BATCH)
    second = SampleStream(stream.names, sizes, weights, 3, 4)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = [second.sample_id(r) for r in second.take((steps - resume_at) * GLOBAL_BATCH)]
    assert rest == reference[resume_at * GLOBAL_BATCH :]


def test_zero_weight_source_is_never_drawn():
    stream = make_stream((1.0, 0.0))
    assert {ref.source for ref in stream.take(500)} == {0}


def test_epochs_are_permutations_reshuffled_deterministically():
    stream = make_stream((1.0,), sizes=(5,))
    refs = stream.take(20)
    epochs = [[r.index for r in refs if r.epoch == e] for e in range(4)]
    assert all(sorted(epoch) == list(range(5)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1, "every epoch has the same order"
    again = make_stream((1.0,), sizes=(5,)).take(20)
    assert again == refs
    assert stream.sample_id(refs[7]) == f"s0/e1/{refs[7].index}"
    assert stream.state_dict()["sources"]["s0"] == {
        "delivered": 20,
        "epoch": 3,
        "position": 5,
        "num_samples": 5,
    }


def test_resume_mid_epoch_of_tiny_source():
    reference = make_stream((0.5, 0.5), sizes=(3, 4)).take(40)
    first = make_stream((0.5, 0.5), sizes=(3, 4))
    first.take(11)
    second = make_stream((0.5, 0.5), sizes=(3, 4))
    second.load_state_dict(first.state_dict())
    assert second.take(29) == reference[11:]
    assert Counter(ref.source for ref in reference) == {0: 20, 1: 20}


def test_load_state_rejects_other_sources_seed_or_sizes():
    state = make_stream().state_dict()
    other = SampleStream(["s0", "code"], [500, 200], [1, 1], seed=0, seq_len=8)
    with pytest.raises(ValueError, match=r"\['s0', 's1'\].*\['s0', 'code'\]"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="seed 0"):
        make_stream(seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="'s1' now packs into 201"):
        make_stream(sizes=(500, 201)).load_state_dict(state)


def test_state_survives_a_key_sorting_json_writer():
    """Checkpoints write JSON with sorted keys; source order must not depend on dict order."""
    first = SampleStream(["zeta", "alpha"], [500, 200], [0.75, 0.25], seed=0, seq_len=8)
    run_ids(first, 3, 1)
    state = json.loads(json.dumps(first.state_dict(), sort_keys=True))
    second = SampleStream(["zeta", "alpha"], [500, 200], [0.75, 0.25], seed=0, seq_len=8)
    second.load_state_dict(state)
    assert run_ids(second, 2, 2) == run_ids(first, 2, 1)
