"""ChunkSampler: the epoch order, slots and sharding, ACT streaming draws, resume, epoch ends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aios.data import ChunkSampler, PreparedDataset, merge_sampler_states, sampler_progress
from aios.data.sampler import EpochOrder
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


# ---- slots and sharding ----


@pytest.mark.parametrize("world_size, micro_batch, grad_accum", [(1, 4, 2), (2, 2, 2), (4, 2, 1)])
def test_one_step_of_all_ranks_is_exactly_the_next_global_batch(
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
        assert len(set(flat.tolist())) == G and sorted(flat.tolist()) == list(range(G))  # disjoint, complete
        for r, s in enumerate(ranks):
            for m in range(grad_accum):
                rows, exhausted = s.draw(s.slots_for(m))
                assert not exhausted
                # rank r's micro-step m takes positions [cursor + (m*W + r)*b, cursor + (m*W + r + 1)*b)
                start = step * G + (m * world_size + r) * micro_batch
                assert np.array_equal(
                    rows, expected_rows(small_dataset, 7, 0, np.arange(start, start + micro_batch))
                )


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

    one, two = per_slot(1, 4, 2), per_slot(2, 2, 2)
    assert sorted(one) == sorted(two) == list(range(8))
    for slot in range(8):
        assert np.array_equal(one[slot], two[slot])  # identical per slot, hence the same multiset per step


def test_slots_for_follows_the_slot_formula(small_dataset):
    s = sampler(small_dataset, micro_batch=3, grad_accum=2, rank=2, world_size=4)
    assert s.slots_for(0).tolist() == [6, 7, 8]  # (0*4 + 2)*3 + row
    assert s.slots_for(1).tolist() == [18, 19, 20]  # (1*4 + 2)*3 + row
    assert s.state_dict()["slots"] == [6, 7, 8, 18, 19, 20]


def test_a_rank_opens_only_the_chunk_files_its_positions_need(small_dataset):
    reader = fresh(small_dataset)
    s = sampler(reader, micro_batch=2, grad_accum=1, rank=1, world_size=4)
    s.draw(s.slots_for(0))  # positions 2, 3 of the order
    ids = EpochOrder(reader, 7, 0).global_ids(np.array([2, 3]))
    assert reader.opened_chunks == set((ids // 16).tolist())
    assert len(reader.opened_chunks) == 1 < reader.num_chunks


# ---- ACT streaming ----


def test_act_draws_advance_only_the_given_slots(small_dataset):
    s = sampler(small_dataset, micro_batch=4, grad_accum=1, rank=0, world_size=2)  # G = 8, slots 0..3
    s.draw(s.slots_for(0))  # every row starts halted: positions 0..3
    rows, _ = s.draw(np.array([1, 3]))  # only rows 1 and 3 halted: their second draws, positions 9 and 11
    assert np.array_equal(rows, expected_rows(small_dataset, 7, 0, [9, 11]))
    assert s.state_dict()["draws"] == [1, 2, 1, 2]
    rows, _ = s.draw(np.array([0, 1, 2, 3]))
    assert np.array_equal(rows, expected_rows(small_dataset, 7, 0, [8, 17, 10, 19]))
    assert s.progress()["cursor"] == 16  # every position below 16 taken by this rank's slots
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
            owner = ranks[(slot // 2) % 2]  # slot = (m*W + r)*b + row
            expected.append(owner.draw(np.array([slot]))[0][0])
        assert np.array_equal(rows, np.stack(expected))


def test_load_state_dict_refuses_another_layout_or_rank(small_dataset):
    state = sampler(small_dataset, rank=0).state_dict()
    with pytest.raises(AiosError, match="global batch"):
        sampler(small_dataset, micro_batch=3).load_state_dict(state)
    with pytest.raises(AiosError, match="lacks slot 2 of rank 1 of 2"):
        sampler(small_dataset, rank=1).load_state_dict(state)
    with pytest.raises(AiosError, match="seed 7"):
        sampler(small_dataset, seed=8).load_state_dict(state)
    with pytest.raises(AiosError, match="malformed"):
        sampler(small_dataset).load_state_dict({"format": 1})


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
    n = small_dataset.num_train
    last_slot = 3
    for _ in range((n - last_slot + 3) // 4):  # slot 3 has positions 3, 7, ... < n
        _, exhausted = s.draw(np.array([last_slot]))
        assert not exhausted
    before = s.state_dict()
    rows, exhausted = s.draw(np.array([0, last_slot]))
    assert exhausted and rows.shape == (0, small_dataset.window)
    assert s.state_dict() == before
    _, exhausted = s.draw(np.array([0]))  # other slots still have data
    assert not exhausted


def test_with_iterate_a_finished_slot_starts_the_next_epoch_at_its_own_position(small_dataset):
    s = sampler(small_dataset, micro_batch=4, grad_accum=1, rank=0, world_size=1, iterate=True)
    n = small_dataset.num_train
    for _ in range((n - 2 + 3) // 4):
        s.draw(np.array([2]))
    rows, exhausted = s.draw(np.array([2, 1]))
    assert not exhausted
    assert np.array_equal(rows[0], expected_rows(small_dataset, 7, 1, [2])[0])  # epoch 1, position s
    assert np.array_equal(rows[1], expected_rows(small_dataset, 7, 0, [1])[0])
    state = s.state_dict()
    assert state["epochs"] == [0, 0, 1, 0] and state["draws"] == [0, 1, 1, 0]


def test_progress_reports_cursor_chunks_and_consumption(small_dataset):
    ranks = [sampler(small_dataset, micro_batch=4, grad_accum=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(10):  # 10 full steps of G = 8: positions [0, 80)
        for s in ranks:
            s.draw(s.slots_for(0))
    progress = sampler_progress(small_dataset, 7, [s.state_dict() for s in ranks])
    order = EpochOrder(small_dataset, 7, 0)
    assert progress["epoch"] == 0 and progress["cursor"] == 80
    assert progress["sequences_consumed"] == 80
    assert progress["chunks_completed"] == int(((order.ends <= 80) & (order.ends > order.starts)).sum())
    assert progress["total_chunks"] == int((small_dataset.train_sizes() > 0).sum())
    assert progress["total_train_sequences"] == small_dataset.num_train
    assert ranks[0].progress()["sequences_consumed"] == 40  # one rank's own view


def test_too_small_a_dataset_for_the_global_batch_is_refused(small_dataset):
    with pytest.raises(AiosError, match="fewer than the global batch"):
        sampler(small_dataset, micro_batch=small_dataset.num_train, grad_accum=1, world_size=2)
