"""ChunkSampler: the epoch order, slots and sharding, ACT streaming draws, resume, epoch ends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aios.data import ChunkSampler, PreparedDataset, merge_sampler_states, sampler_progress
from aios.data.sampler import EpochOrder, partition_starts
from aios.errors import AiosError


def sampler(dataset, *, seed=7, micro_batch=2, grad_accum=2, rank=0, world_size=2, iterate=False):
    return ChunkSampler(
        dataset,
        seed=seed,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        rank=rank,
        world_size=world_size,
        iterate=iterate,
    )


def expected_rows(dataset, seed, epoch, positions):
    """What the contract says lies at `positions` of the epoch order."""
    return dataset.get(EpochOrder(dataset, seed, epoch).global_ids(np.asarray(positions)))


def fresh(dataset: PreparedDataset) -> PreparedDataset:
    return PreparedDataset(dataset.path)  # its own memory maps and opened-chunk record


# ---- the epoch order ----


def test_epoch_order_is_a_permutation_of_the_train_sequences(small_dataset):
    order = EpochOrder(small_dataset, seed=3, epoch=0).global_ids(np.arange(small_dataset.num_train))
    assert sorted(order.tolist()) == list(range(small_dataset.num_train))  # held-out ids never appear


def test_epoch_order_permutes_chunks_then_shuffles_inside_each(small_dataset):
    order = EpochOrder(small_dataset, seed=3, epoch=0)
    ids = order.global_ids(np.arange(small_dataset.num_train))
    chunks_in_order = ids // 16
    # Each chunk's sequences are contiguous in the order, in the permuted chunk order.
    boundaries = np.flatnonzero(np.diff(chunks_in_order)) + 1
    visited = [int(c) for c in chunks_in_order[np.r_[0, boundaries]]]
    assert len(visited) == len(set(visited)) == int((small_dataset.train_sizes() > 0).sum())
    rng = np.random.default_rng([3, 0])
    assert visited == [c for c in rng.permutation(small_dataset.num_chunks).tolist() if c in visited]
    assert not np.array_equal(ids, np.sort(ids))  # shuffled inside chunks
    first_chunk = visited[0]
    inner = np.random.default_rng([3, 0, first_chunk]).permutation(16)
    assert np.array_equal(ids[:16], first_chunk * 16 + inner)


def test_order_is_a_pure_function_of_seed_and_epoch(small_dataset):
    positions = np.arange(small_dataset.num_train)
    a = EpochOrder(small_dataset, 11, 0).global_ids(positions)
    b = EpochOrder(fresh(small_dataset), 11, 0).global_ids(positions)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, EpochOrder(small_dataset, 11, 1).global_ids(positions))  # epochs differ
    assert not np.array_equal(a, EpochOrder(small_dataset, 12, 0).global_ids(positions))  # seeds differ
    # Two samplers with the same seed draw the same stream.
    one, two = sampler(small_dataset), sampler(fresh(small_dataset))
    for m in (0, 1, 0, 1):
        assert np.array_equal(one.draw(one.slots_for(m))[0], two.draw(two.slots_for(m))[0])


# ---- partitions, slots and sharding ----


def stretch(dataset, G, slot):
    """Positions of the epoch order that partition (slot) `slot` reads, front to back."""
    starts = partition_starts(dataset.num_train, G)
    return np.arange(starts[slot], starts[slot + 1])


def test_partitions_cut_the_order_into_g_nearly_equal_contiguous_stretches(small_dataset):
    n = small_dataset.num_train
    starts = partition_starts(n, 8)
    assert starts[0] == 0 and starts[-1] == n and len(starts) == 9
    assert set(np.diff(starts).tolist()) <= {n // 8, n // 8 + 1}  # every sequence in exactly one stretch


@pytest.mark.parametrize("world_size, micro_batch, grad_accum", [(1, 4, 2), (2, 2, 2), (4, 2, 1)])
def test_each_slot_reads_its_own_stretch_and_a_step_takes_one_row_of_each(
    small_dataset, world_size, micro_batch, grad_accum
):
    G = 8
    assert micro_batch * grad_accum * world_size == G
    ranks = [
        sampler(small_dataset, micro_batch=micro_batch, grad_accum=grad_accum, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for step in range(3):
        slots = [np.concatenate([s.slots_for(m) for m in range(grad_accum)]) for s in ranks]
        flat = np.concatenate(slots)
        assert sorted(flat.tolist()) == list(range(G))  # disjoint, complete
        for r, s in enumerate(ranks):
            assert slots[r].tolist() == list(range(r * G // world_size, (r + 1) * G // world_size))  # a block
            for m in range(grad_accum):
                rows, exhausted = s.draw(s.slots_for(m))
                assert not exhausted
                positions = [stretch(small_dataset, G, slot)[step] for slot in s.slots_for(m).tolist()]
                assert np.array_equal(rows, expected_rows(small_dataset, 7, 0, positions))


def test_changing_world_size_with_the_same_global_batch_keeps_every_slots_samples(small_dataset):
    def per_slot(world_size, micro_batch, grad_accum, steps=4):
        out = {}
        for r in range(world_size):
            s = sampler(
                small_dataset, micro_batch=micro_batch, grad_accum=grad_accum, rank=r, world_size=world_size
            )
            for _ in range(steps):
                for m in range(grad_accum):
                    slots = s.slots_for(m)
                    rows, _ = s.draw(slots)
                    for slot, row in zip(slots.tolist(), rows, strict=True):
                        out.setdefault(slot, []).append(row)
        return {slot: np.stack(rows) for slot, rows in out.items()}

    one, two, four = per_slot(1, 4, 2), per_slot(2, 2, 2), per_slot(4, 1, 2)
    assert sorted(one) == sorted(two) == sorted(four) == list(range(8))
    for slot in range(8):
        assert np.array_equal(one[slot], two[slot]) and np.array_equal(one[slot], four[slot])


def test_slots_for_follows_the_rank_major_slot_formula(small_dataset):
    s = sampler(small_dataset, micro_batch=3, grad_accum=2, rank=2, world_size=4)
    assert s.slots_for(0).tolist() == [12, 13, 14]  # r*R + m*b + row, R = 6
    assert s.slots_for(1).tolist() == [15, 16, 17]
    assert s.state_dict()["slots"] == [12, 13, 14, 15, 16, 17]


def test_over_an_epoch_each_rank_opens_about_its_share_of_the_chunk_files(small_dataset):
    W = 2  # G = 8
    total = int((small_dataset.train_sizes() > 0).sum())
    opened = []
    for r in range(W):
        reader = fresh(small_dataset)
        s = sampler(reader, micro_batch=4, grad_accum=1, rank=r, world_size=W)
        while not s.draw(s.slots_for(0))[1]:
            pass
        opened.append(reader.opened_chunks)
    # each rank: its half of the chunks, plus at most the one chunk its block shares with the other rank
    assert all(len(o) <= total // W + 1 for o in opened)
    assert len(opened[0] & opened[1]) <= 1 and len(opened[0] | opened[1]) == total


def test_a_global_step_draws_from_about_min_chunks_rows_distinct_chunks(small_dataset):
    G = 8
    chunk_of_row = {bytes(row.astype(np.uint16)): int(np.searchsorted(small_dataset.chunk_offsets, i, side="right") - 1)
                    for i, row in enumerate(small_dataset.get(np.arange(small_dataset.num_train)))}
    s = sampler(small_dataset, micro_batch=G, grad_accum=1, world_size=1)
    for _ in range(5):
        rows, _ = s.draw(s.slots_for(0))
        chunks = {chunk_of_row[bytes(row.astype(np.uint16))] for row in rows}
        assert len(chunks) >= G - 1  # a stretch of ~55 sequences spans ~4 chunks of 16: neighbours rarely share


def test_a_rank_opens_only_the_chunk_files_its_positions_need(small_dataset):
    reader = fresh(small_dataset)
    s = sampler(reader, micro_batch=2, grad_accum=1, rank=1, world_size=4)  # slots 2 and 3
    s.draw(s.slots_for(0))
    positions = [stretch(reader, 8, 2)[0], stretch(reader, 8, 3)[0]]
    ids = EpochOrder(reader, 7, 0).global_ids(np.array(positions))
    opened = set((np.searchsorted(reader.chunk_offsets, ids, side="right") - 1).tolist())
    assert reader.opened_chunks == opened and len(opened) <= 2 < reader.num_chunks


# ---- ACT streaming ----


def test_act_draws_advance_only_the_given_slots(small_dataset):
    s = sampler(small_dataset, micro_batch=4, grad_accum=1, rank=0, world_size=2)  # G = 8, slots 0..3
    s.draw(s.slots_for(0))  # every row starts halted: the first sequence of each stretch
    rows, _ = s.draw(np.array([1, 3]))  # only rows 1 and 3 halted: their second draws
    assert np.array_equal(rows, expected_rows(small_dataset, 7, 0, [stretch(small_dataset, 8, 1)[1],
                                                                    stretch(small_dataset, 8, 3)[1]]))
    assert s.state_dict()["draws"] == [1, 2, 1, 2]
    with pytest.raises(ValueError):
        s.draw(np.array([4]))  # slot 4 belongs to rank 1
    with pytest.raises(ValueError):
        s.draw(np.array([2, 2]))


def random_act_run(s: ChunkSampler, rng: np.random.Generator, draws: int) -> list[np.ndarray]:
    """Draw for random subsets of rows, as halting would."""
    out = []
    for _ in range(draws):
        m = int(rng.integers(s.grad_accum))
        slots = s.slots_for(m)
        halted = slots[rng.random(len(slots)) < 0.5]
        if len(halted):
            rows, exhausted = s.draw(halted)
            assert not exhausted
            out.append(rows)
    return out


def test_state_dict_resumes_the_exact_same_stream(small_dataset):
    s = sampler(small_dataset, iterate=True)
    random_act_run(s, np.random.default_rng(0), 40)
    state = json.loads(json.dumps(s.state_dict()))  # plain JSON
    continued = random_act_run(s, np.random.default_rng(1), 500)  # crosses an epoch end

    resumed = sampler(fresh(small_dataset), iterate=True)
    resumed.load_state_dict(state)
    again = random_act_run(resumed, np.random.default_rng(1), 500)
    assert max(s.state_dict()["epochs"]) >= 1
    assert len(continued) == len(again)
    assert all(np.array_equal(a, b) for a, b in zip(continued, again, strict=True))


def test_merged_states_resume_under_another_world_size(small_dataset):
    ranks = [sampler(small_dataset, rank=r, world_size=2) for r in range(2)]  # b=2, A=2, G=8
    for r, s in enumerate(ranks):
        random_act_run(s, np.random.default_rng(r), 15)
    merged = merge_sampler_states([s.state_dict() for s in ranks])
    solo = sampler(fresh(small_dataset), micro_batch=4, grad_accum=2, rank=0, world_size=1)  # G=8
    solo.load_state_dict(merged)
    for m in range(2):
        rows, _ = solo.draw(solo.slots_for(m))
        expected = []
        for slot in solo.slots_for(m).tolist():
            owner = ranks[slot // 4]  # rank-major: slot = r*R + m*b + row, R = 4
            expected.append(owner.draw(np.array([slot]))[0][0])
        assert np.array_equal(rows, np.stack(expected))


def test_load_state_dict_refuses_another_layout_or_rank(small_dataset):
    state = sampler(small_dataset, rank=0).state_dict()
    with pytest.raises(AiosError, match="global batch"):
        sampler(small_dataset, micro_batch=3).load_state_dict(state)
    with pytest.raises(AiosError, match="lacks slot 4 of rank 1 of 2"):
        sampler(small_dataset, rank=1).load_state_dict(state)
    with pytest.raises(AiosError, match="seed 7"):
        sampler(small_dataset, seed=8).load_state_dict(state)
    with pytest.raises(AiosError, match="malformed"):
        sampler(small_dataset).load_state_dict({"format": 1})
    with pytest.raises(AiosError, match="format 1"):  # the strided order of older checkpoints
        sampler(small_dataset).load_state_dict({**state, "format": 1})


# ---- epoch ends and the held-out tail ----


def test_a_full_epoch_draws_every_train_sequence_once_and_no_holdout(small_dataset):
    s = sampler(small_dataset, micro_batch=1, grad_accum=1, rank=0, world_size=1, iterate=False)
    rows = []
    while True:
        batch, exhausted = s.draw(s.slots_for(0))
        if exhausted:
            break
        rows.append(batch[0])
    drawn = np.stack(rows)
    assert len(drawn) == small_dataset.num_train
    train = small_dataset.get(np.arange(small_dataset.num_train))
    assert sorted(map(bytes, drawn.astype(np.uint16))) == sorted(map(bytes, train.astype(np.uint16)))
    holdout = {
        bytes(r)
        for r in small_dataset.get(np.arange(small_dataset.num_train, small_dataset.num_sequences)).astype(
            np.uint16
        )
    }
    assert not holdout & {bytes(r) for r in drawn.astype(np.uint16)}


def test_without_iterate_a_finished_slot_reports_exhausted_and_nothing_moves(small_dataset):
    s = sampler(small_dataset, micro_batch=4, grad_accum=1, rank=0, world_size=1)  # G = 4
    last_slot = 3
    for _ in range(len(stretch(small_dataset, 4, last_slot))):
        _, exhausted = s.draw(np.array([last_slot]))
        assert not exhausted
    before = s.state_dict()
    rows, exhausted = s.draw(np.array([0, last_slot]))
    assert exhausted and rows.shape == (0, small_dataset.window)
    assert s.state_dict() == before
    _, exhausted = s.draw(np.array([0]))  # other slots still have data
    assert not exhausted


def test_with_iterate_a_finished_slot_starts_the_next_epoch_at_the_start_of_its_stretch(small_dataset):
    s = sampler(small_dataset, micro_batch=4, grad_accum=1, rank=0, world_size=1, iterate=True)
    for _ in range(len(stretch(small_dataset, 4, 2))):
        s.draw(np.array([2]))
    rows, exhausted = s.draw(np.array([2, 1]))
    assert not exhausted
    assert np.array_equal(rows[0], expected_rows(small_dataset, 7, 1, [stretch(small_dataset, 4, 2)[0]])[0])
    assert np.array_equal(rows[1], expected_rows(small_dataset, 7, 0, [stretch(small_dataset, 4, 1)[0]])[0])
    state = s.state_dict()
    assert state["epochs"] == [0, 0, 1, 0] and state["draws"] == [0, 1, 1, 0]


def test_the_tracker_names_completed_chunks_and_the_partitions_reading_the_others(small_dataset):
    ranks = [sampler(small_dataset, micro_batch=4, grad_accum=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(10):  # 10 draws of every slot: the first 10 positions of each stretch
        for s in ranks:
            s.draw(s.slots_for(0))
    progress = sampler_progress(small_dataset, 7, [s.state_dict() for s in ranks])
    order = EpochOrder(small_dataset, 7, 0)
    read = {int(p) for slot in range(8) for p in stretch(small_dataset, 8, slot)[:10]}
    nonempty = order.ends > order.starts
    complete = sorted(int(c) for c, a, b in zip(order.chunk_order[nonempty], order.starts[nonempty],
                                                order.ends[nonempty], strict=True)
                      if set(range(a, b)) <= read)
    assert progress["epoch"] == 0 and progress["sequences_consumed"] == 80
    assert progress["epochs"]["0"]["chunks_completed"] == complete and progress["chunks_completed"] == len(complete)
    in_progress = progress["epochs"]["0"]["chunks_in_progress"]
    for slot in range(8):  # each partition is reading the chunk of its newest sample
        newest = order.global_ids(np.array([stretch(small_dataset, 8, slot)[9]]))[0]
        chunk = int(np.searchsorted(small_dataset.chunk_offsets, newest, side="right") - 1)
        assert chunk in complete or slot in in_progress[str(chunk)]
    assert progress["total_chunks"] == int((small_dataset.train_sizes() > 0).sum())
    assert progress["total_train_sequences"] == small_dataset.num_train
    assert progress["partitions"] == 8
    assert progress["state"] == merge_sampler_states([s.state_dict() for s in ranks])  # exact resume from it
    assert ranks[0].progress()["sequences_consumed"] == 40  # one rank's own view
    assert ranks[0].progress()["epochs"]["0"]["chunks_completed"] is None  # a partial view cannot tell


def test_too_small_a_dataset_for_the_global_batch_is_refused(small_dataset):
    with pytest.raises(AiosError, match="fewer than the global batch"):
        sampler(small_dataset, micro_batch=small_dataset.num_train, grad_accum=1, world_size=2)
