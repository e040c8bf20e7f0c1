"""`build_data` end to end: world-size independent batches, resumable state, eval batches."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from tests.distributed import run_distributed
from trainer.data import IGNORE_INDEX, Data, DataConfig, SourceConfig, build_data

GLOBAL, MICRO = 12, 2


def run_steps(data: Data, dp_size: int, steps: int) -> list[tuple[list[str], torch.Tensor]]:
    """Per step: the global ids and the rank slices' inputs concatenated in rank order.

    Ranks are simulated in one process by copying the stream state to one Data per rank."""
    ranks = [data] + [build_like(data) for _ in range(dp_size - 1)]
    for rank in ranks[1:]:
        rank.load_state_dict(data.state_dict())
    results = []
    for _ in range(steps):
        batches = [rank.next_step_batches(r, dp_size) for r, rank in enumerate(ranks)]
        assert all(len(b) == GLOBAL // dp_size // MICRO for b in batches)
        assert len({tuple(rank.last_sample_ids) for rank in ranks}) == 1
        inputs = torch.cat([x for rank_batches in batches for x, _ in rank_batches])
        results.append((data.last_sample_ids, inputs))
    return results


def build_like(data: Data) -> Data:
    return build_data(data.cfg, data.stream.seed, GLOBAL, MICRO)


def test_batches_identical_for_dp_sizes_1_2_3(two_source_cfg):
    reference_data = build_data(two_source_cfg, 7, GLOBAL, MICRO)
    reference = run_steps(reference_data, dp_size=1, steps=6)
    for dp_size in (2, 3):
        data = build_data(two_source_cfg, 7, GLOBAL, MICRO)
        result = run_steps(data, dp_size, steps=6)
        assert data.tokens_by_source == reference_data.tokens_by_source
        assert [ids for ids, _ in result] == [ids for ids, _ in reference]
        for (_, inputs), (_, expected) in zip(result, reference):
            assert torch.equal(inputs, expected)


def test_inputs_targets_shift_and_match_ids(two_source_cfg):
    data = build_data(two_source_cfg, 0, GLOBAL, MICRO)
    (inputs, targets), *_ = data.next_step_batches(0, 1)
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == (MICRO, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    name, epoch, index = data.last_sample_ids[0].split("/")
    row = data.sources[data.source_names.index(name)].train[int(index)]
    assert epoch == "e0" and inputs[0].tolist() == row[:-1].tolist()


def test_resume_under_other_dp_size(two_source_cfg):
    uninterrupted = run_steps(build_data(two_source_cfg, 1, GLOBAL, MICRO), 1, steps=9)
    first = build_data(two_source_cfg, 1, GLOBAL, MICRO)
    run_steps(first, dp_size=2, steps=4)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_data(two_source_cfg, 1, GLOBAL, MICRO)
    resumed.load_state_dict(state)
    assert resumed.tokens_by_source == first.tokens_by_source
    rest = run_steps(resumed, dp_size=3, steps=5)
    assert [ids for ids, _ in rest] == [ids for ids, _ in uninterrupted[4:]]
    assert sum(resumed.tokens_by_source.values()) == 9 * GLOBAL * two_source_cfg.seq_len


def test_new_sources_refuse_old_state(two_source_cfg):
    state = build_data(two_source_cfg, 0, GLOBAL, MICRO).state_dict()
    two_source_cfg.sources[1].name = "code"
    with pytest.raises(ValueError, match="'code'"):
        build_data(two_source_cfg, 0, GLOBAL, MICRO).load_state_dict(state)


def real_eval_rows(data: Data, name: str, dp_size: int) -> tuple[list[list[int]], set[int]]:
    rows, batch_counts = [], set()
    for rank in range(dp_size):
        batches = data.eval_batches(name, rank, dp_size)
        batch_counts.add(len(batches))
        for inputs, targets in batches:
            assert inputs.shape == targets.shape == (MICRO, data.cfg.seq_len)
            keep = targets[:, 0] != IGNORE_INDEX
            assert (targets[~keep] == IGNORE_INDEX).all()
            rows += torch.cat([inputs[keep], targets[keep][:, -1:]], dim=1).tolist()
    return rows, batch_counts


def test_eval_batches_cover_the_same_rows_for_every_dp_size(two_source_cfg):
    data = build_data(two_source_cfg, 0, GLOBAL, MICRO)
    for name in data.source_names:
        held_out = data.sources[data.source_names.index(name)].eval
        expected = held_out[: two_source_cfg.eval_batches * MICRO].tolist()
        for dp_size in (1, 2, 3, 4):
            rows, batch_counts = real_eval_rows(data, name, dp_size)
            assert rows == expected and len(batch_counts) == 1
    with pytest.raises(ValueError, match="'nope'"):
        data.eval_batches("nope", 0, 1)
    two_source_cfg.eval_batches = 0
    assert build_data(two_source_cfg, 0, GLOBAL, MICRO).eval_batches("a", 0, 2) == []


def test_sample_ids_only_when_recorded(two_source_cfg):
    two_source_cfg.record_sample_ids = False
    data = build_data(two_source_cfg, 0, GLOBAL, MICRO)
    data.next_step_batches(0, 1)
    with pytest.raises(RuntimeError, match="record_sample_ids"):
        _ = data.last_sample_ids


def test_batch_size_errors(two_source_cfg):
    with pytest.raises(ValueError, match="divisible by micro_batch_size"):
        build_data(two_source_cfg, 0, 12, 5)
    with pytest.raises(AssertionError):
        build_data(two_source_cfg, 0, 12, 2).next_step_batches(0, 4)


def test_prose_to_code_mix_on_builtin_corpora(builtin_cache_dir):
    cfg = DataConfig(
        sources=[SourceConfig("prose", "stdlib:prose", 3), SourceConfig("code", "stdlib:code", 1)],
        seq_len=32,
        cache_dir=builtin_cache_dir,
        record_sample_ids=True,
    )
    data = build_data(cfg, 0, 16, 4)
    for _ in range(25):
        data.next_step_batches(0, 1)
    assert data.tokens_by_source == {"prose": 300 * 32, "code": 100 * 32}
    sources = [sample.split("/")[0] for sample in data.last_sample_ids]
    assert sources[:4] == ["prose", "prose", "code", "prose"]  # the greedy rule, ties to prose
    assert sources.count("code") == 4


def build_and_step(cfg: DataConfig) -> tuple[list[list[str]], list[list[int]]]:
    import torch.distributed as dist

    data = build_data(cfg, 5, GLOBAL, MICRO)
    ids, sums = [], []
    for _ in range(3):
        batches = data.next_step_batches(dist.get_rank(), dist.get_world_size())
        ids.append(data.last_sample_ids)
        sums.append([int(inputs.sum()) for inputs, _ in batches])
    return ids, sums


def test_real_ranks_build_concurrently_and_agree(two_source_cfg):
    ranks = run_distributed(build_and_step, world_size=2, args=(two_source_cfg,))
    reference = build_data(two_source_cfg, 5, GLOBAL, MICRO)
    expected_sums = []
    for step in range(3):
        batches = reference.next_step_batches(0, 1)
        assert ranks[0][0][step] == ranks[1][0][step] == reference.last_sample_ids
        expected_sums.append([int(inputs.sum()) for inputs, _ in batches])
    assert [r0 + r1 for r0, r1 in zip(ranks[0][1], ranks[1][1])] == expected_sums


def test_prefetch_loads_ahead_in_a_thread_and_changes_no_sample(two_source_cfg):
    two_source_cfg.prefetch = 0
    synchronous = run_steps(build_data(two_source_cfg, 2, GLOBAL, MICRO), 2, steps=8)
    two_source_cfg.prefetch = 2
    data = build_data(two_source_cfg, 2, GLOBAL, MICRO)
    threads, load = [], data._load

    def recording_load(refs):
        threads.append(threading.current_thread().name)
        return load(refs)

    data._prefetch.load = recording_load
    first = run_steps(data, 1, steps=3)
    assert int(data.stream.delivered.sum()) == 5 * GLOBAL  # the stream ran 2 steps ahead
    assert data.state_dict()["cursor"] == 3 * GLOBAL  # the state: what was handed out
    assert sum(data.tokens_by_source.values()) == 3 * GLOBAL * two_source_cfg.seq_len
    assert threads[0] == "MainThread" and set(threads[1:]) == {"perennial-prefetch_0"}
    state = data.state_dict()
    resumed = build_data(two_source_cfg, 2, GLOBAL, MICRO)
    resumed.load_state_dict(state)
    rest = run_steps(resumed, 2, steps=5)
    assert [ids for ids, _ in first + rest] == [ids for ids, _ in synchronous]
    for (_, inputs), (_, expected) in zip(first + rest, synchronous):
        assert torch.equal(inputs, expected)
    data.load_state_dict(state)  # drops what was read ahead
    assert [ids for ids, _ in run_steps(data, 1, steps=5)] == [ids for ids, _ in rest]
