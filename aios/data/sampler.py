"""The chunk sampler: a deterministic, resumable, sharded and well-mixed order over the train sequences.

The contract (it supersedes the sampler section of DESIGN.md):

Epoch order. The order of epoch e is a pure function of (seed, e, the manifest's chunk sizes): the chunk
ids are permuted with `np.random.default_rng([seed, e])`, the sequences inside chunk c are shuffled with
`np.random.default_rng([seed, e, c])`, and the chunks' train sequences are concatenated in permuted order.
Only train sequences take part: a chunk cut by the held-out tail contributes its train part, held-out
sequences never appear. Positions 0..N-1 (N = num_train) index this order; it is computed lazily, one chunk
at a time, so a reader opens only the chunk files its positions fall in.

Partitions. A global step has G = micro_batch * grad_accum * world_size rows, the slots; G is fixed for the
whole run (a resume must keep it), and so is the partition count, G. Slot s is partition s: it owns the
contiguous stretch [start(s), start(s + 1)) of every epoch's order, start(s) = s * N // G, and reads it
front to back, one sample each time its row halts (ACT streaming). The order of the samples each slot
reads is therefore a pure function of (seed, epoch, dataset, G), whatever the world size or batch split.

Mixing. The G rows of one global step sit in G different stretches of the order, so they come from about
min(chunks, G) distinct chunks, not from one contiguous stretch of the text.

Sharding. Rank r owns the contiguous block of slots [r * R, (r + 1) * R), R = micro_batch * grad_accum
(row i of its micro-step m is slot r * R + m * micro_batch + i), so over an epoch it reads about 1/W of the
order, and of the chunk files (plus at most one shared chunk at each end of its block). Changing the
micro-batch split inside a rank (an OOM back-off) keeps every slot on its rank.

Elastic resume. The state is one (epoch, draws) pair per slot; the global state is the union over ranks
(`merge_sampler_states`), and any layout with the same G loads the slots it owns from it, so a run resumed
with another world size at the same global batch continues the identical per-slot streams.

End of epoch. A slot that has read its whole stretch has finished the epoch. With `iterate=False`, `draw`
then reports exhausted=True, draws nothing and moves no counter (end of data: the loop stops). With
`iterate=True` that slot continues at once in epoch e + 1, at the start of its stretch in the new order
(epochs are per slot). Requires N >= G, so every stretch holds at least one sequence.

Tracking. `sampler_progress` turns the states of all ranks into chunk_tracker_state.json: per epoch the
chunks completed (every sequence read) and the chunks in progress with the partitions reading them, plus
the merged state itself, from which a resume is exact.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from aios.data.dataset import PreparedDataset
from aios.errors import AiosError

STATE_FORMAT = 2  # 1: slot s read positions s, s + G, s + 2G, ... (every rank read every chunk)
_INNER_ORDERS_CACHED = 64


def partition_starts(num_train: int, partitions: int) -> np.ndarray:
    """Where each partition's stretch of the epoch order begins, and (last entry) N: (partitions + 1,)."""
    return np.arange(partitions + 1, dtype=np.int64) * num_train // partitions


class EpochOrder:
    """Maps positions of one epoch's order to global sequence ids."""

    def __init__(self, dataset: PreparedDataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch
        self.chunk_order = np.random.default_rng([seed, epoch]).permutation(dataset.num_chunks)
        self.train_sizes = dataset.train_sizes()  # (num_chunks,)
        # ends[k]: positions consumed once the k-th chunk of the order is done
        self.ends = np.cumsum(self.train_sizes[self.chunk_order])
        self.starts = self.ends - self.train_sizes[self.chunk_order]
        self._inner: OrderedDict[int, np.ndarray] = OrderedDict()

    def global_ids(self, positions: np.ndarray) -> np.ndarray:
        """Global sequence ids at `positions` (each in [0, num_train))."""
        positions = np.asarray(positions, dtype=np.int64)
        rank_in_order = np.searchsorted(self.ends, positions, side="right")  # skips empty chunks
        ids = np.empty_like(positions)
        for k in np.unique(rank_in_order):
            chunk = int(self.chunk_order[k])
            where = rank_in_order == k
            within = positions[where] - self.starts[k]
            ids[where] = self.dataset.chunk_offsets[chunk] + self._inner_order(chunk)[within]
        return ids

    def _inner_order(self, chunk: int) -> np.ndarray:
        order = self._inner.get(chunk)
        if order is None:
            rng = np.random.default_rng([self.seed, self.epoch, chunk])
            order = rng.permutation(int(self.train_sizes[chunk]))
            self._inner[chunk] = order
            if len(self._inner) > _INNER_ORDERS_CACHED:
                self._inner.popitem(last=False)
        return order


class ChunkSampler:
    """Draws train sequences for this rank's slots (see the module docstring for the contract)."""

    def __init__(
        self,
        dataset: PreparedDataset,
        *,
        seed: int,
        micro_batch: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        iterate: bool,
    ):
        if seed < 0:
            raise AiosError(f"the data seed must be >= 0, got {seed}: pass a non-negative --seed")
        if micro_batch < 1 or grad_accum < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad layout: micro_batch={micro_batch} grad_accum={grad_accum} rank={rank}/{world_size}"
            )
        self.dataset = dataset
        self.seed, self.iterate = seed, iterate
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.rank, self.world_size = rank, world_size
        self.global_slots = micro_batch * grad_accum * world_size  # G
        self.num_train = dataset.num_train
        if self.num_train < self.global_slots:
            raise AiosError(
                f"the dataset has {self.num_train} training sequences, fewer than the global batch "
                f"{self.global_slots} (micro-batch x accumulation x world size): use more text, a smaller "
                f"--max-seq-len or a smaller batch"
            )
        self.rows_per_rank = micro_batch * grad_accum  # R
        self.starts = partition_starts(self.num_train, self.global_slots)
        self.sizes = np.diff(self.starts)  # sequences of each partition per epoch (N // G or one more)
        # This rank's slots, in local order (micro-step major): (grad_accum * micro_batch,)
        self.slot_ids = np.arange(rank * self.rows_per_rank, (rank + 1) * self.rows_per_rank, dtype=np.int64)
        self.epochs = np.zeros(len(self.slot_ids), dtype=np.int64)
        self.draws = np.zeros(len(self.slot_ids), dtype=np.int64)  # draws of each slot in its epoch
        self._orders: OrderedDict[int, EpochOrder] = OrderedDict()

    def slots_for(self, micro_step: int) -> np.ndarray:
        """Global slot ids of this rank's rows in `micro_step`: (micro_batch,)."""
        first = self.rank * self.rows_per_rank + micro_step * self.micro_batch
        return np.arange(first, first + self.micro_batch, dtype=np.int64)

    def draw(self, slots: np.ndarray) -> tuple[np.ndarray, bool]:
        """The next sample of each slot: ((len(slots), window) int64, exhausted).

        exhausted=True (only with iterate=False) means some slot has finished the epoch; then nothing is
        drawn and no counter moves.
        """
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        local = self._local_index(slots)
        finished = self.draws[local] >= self.sizes[slots]
        if finished.any():
            if not self.iterate:
                return np.empty((0, self.dataset.window), dtype=np.int64), True
            self.epochs[local[finished]] += 1
            self.draws[local[finished]] = 0
        positions = self.starts[slots] + self.draws[local]
        ids = np.empty_like(positions)
        epochs = self.epochs[local]
        for epoch in np.unique(epochs):
            where = epochs == epoch
            ids[where] = self._order(int(epoch)).global_ids(positions[where])
        self.draws[local] += 1
        if self.dataset.prefetches:  # chunks that come over the network: ask for each slot's next one now
            self.dataset.prefetch(self._next_chunks(slots, local))
        return self.dataset.get(ids), False

    def _next_chunks(self, slots: np.ndarray, local: np.ndarray) -> list[int]:
        """The chunk each of these slots reads after the one it is in (within its stretch of its epoch)."""
        upcoming = set()
        for slot, i in zip(slots.tolist(), local.tolist(), strict=True):
            if self.draws[i] >= self.sizes[slot]:
                continue  # the epoch ends for this slot: the next one starts elsewhere, read on demand
            order = self._order(int(self.epochs[i]))
            position = self.starts[slot] + self.draws[i]  # the slot's next sample
            k = int(np.searchsorted(order.ends, position, side="right"))
            nxt = int(np.searchsorted(order.ends, order.ends[k], side="right"))  # skips empty chunks
            upcoming.add(int(order.chunk_order[k]))
            if order.ends[k] < self.starts[slot + 1] and nxt < len(order.chunk_order):
                upcoming.add(int(order.chunk_order[nxt]))
        return sorted(upcoming)

    def state_dict(self) -> dict:
        """This rank's sampler state: plain JSON-able values."""
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "num_train": self.num_train,
            "global_slots": self.global_slots,
            "rank": self.rank,
            "world_size": self.world_size,
            "slots": self.slot_ids.tolist(),
            "epochs": self.epochs.tolist(),
            "draws": self.draws.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from a state of this rank, or from a merged state that covers this rank's slots."""
        try:
            by_slot = _slot_table(state)
            checks = [
                ("format", state["format"], STATE_FORMAT),
                (
                    "global batch (micro-batch x accumulation x world size)",
                    state["global_slots"],
                    self.global_slots,
                ),
                ("seed", state["seed"], self.seed),
                ("number of training sequences", state["num_train"], self.num_train),
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise AiosError(
                f"the sampler state is malformed ({exc!r}): resume from an intact checkpoint"
            ) from None
        for what, saved, ours in checks:
            if saved != ours:
                raise AiosError(
                    f"the sampler state was saved with {what} {saved}, this run has {ours}: resume with the "
                    f"same settings and dataset, or start a new run"
                )
        missing = [int(s) for s in self.slot_ids if int(s) not in by_slot]
        if missing:
            raise AiosError(
                f"the sampler state (rank {state.get('rank')} of {state.get('world_size')}) lacks slot "
                f"{missing[0]} of rank {self.rank} of {self.world_size}: load the state of the same rank, "
                f"or a merged state of all ranks"
            )
        self.epochs = np.array([by_slot[int(s)][0] for s in self.slot_ids], dtype=np.int64)
        self.draws = np.array([by_slot[int(s)][1] for s in self.slot_ids], dtype=np.int64)

    def progress(self) -> dict:
        """Human-readable progress over this rank's slots (for chunk_tracker_state.json)."""
        return sampler_progress(self.dataset, self.seed, [self.state_dict()])

    def _local_index(self, slots: np.ndarray) -> np.ndarray:
        local = slots - self.rank * self.rows_per_rank
        if np.any(local < 0) or np.any(local >= self.rows_per_rank) or len(np.unique(slots)) != len(slots):
            raise ValueError(f"slots {slots.tolist()} are not distinct slots of rank {self.rank}")
        return local

    def _order(self, epoch: int) -> EpochOrder:
        order = self._orders.get(epoch)
        if order is None:
            order = self._orders[epoch] = EpochOrder(self.dataset, self.seed, epoch)
            if len(self._orders) > 2:  # slots are usually within one epoch of each other
                self._orders.popitem(last=False)
        return order


def distinct_chunks_per_step(dataset: PreparedDataset, global_batch: int, *, seed: int = 0, steps: int = 8) -> float:
    """Mixing: the mean number of distinct chunks the rows of one global step come from, over the first
    `steps` steps of epoch 0 with every row drawing each step (at most min(chunks, global batch))."""
    global_batch = min(global_batch, dataset.num_train)
    starts = partition_starts(dataset.num_train, global_batch)
    order = EpochOrder(dataset, seed, 0)
    counts = []
    for j in range(steps):
        positions = starts[:-1] + j
        positions = positions[positions < starts[1:]]
        chunk_of = np.searchsorted(dataset.chunk_offsets, order.global_ids(positions), side="right") - 1
        counts.append(len(np.unique(chunk_of)))
    return float(np.mean(counts))


def merge_sampler_states(states: list[dict]) -> dict:
    """One state covering the slots of all given rank states (e.g. to resume with another world size)."""
    if not states:
        raise ValueError("no sampler states to merge")
    merged = {key: states[0][key] for key in ("format", "seed", "num_train", "global_slots")}
    for state in states[1:]:
        for key in merged:
            if state[key] != merged[key]:
                raise AiosError(
                    f"sampler states disagree on {key} ({state[key]} vs {merged[key]}): merge states of one run"
                )
    table: dict[int, tuple[int, int]] = {}
    for state in states:
        table.update(_slot_table(state))
    slots = sorted(table)
    merged.update(
        rank=None,
        world_size=None,
        slots=slots,
        epochs=[table[s][0] for s in slots],
        draws=[table[s][1] for s in slots],
    )
    return merged


def sampler_progress(dataset: PreparedDataset, seed: int, states: list[dict]) -> dict:
    """Progress over the slots of the given states (one rank's, or all ranks' for the global view).

    epoch: the lowest epoch of any slot; chunks_completed: chunks of that epoch whose train sequences have
    all been read; epochs: for every epoch some slot is in, the ids of the chunks completed and, for the
    chunks in progress, the partitions (slots) whose last sample came from them; sequences_consumed: draws
    over all epochs; state: the merged sampler state (a resume from it is exact)."""
    table: dict[int, tuple[int, int]] = {}
    for state in states:
        table.update(_slot_table(state))
    global_slots = int(states[0]["global_slots"])
    num_train = dataset.num_train
    starts = partition_starts(num_train, global_slots)
    sizes = np.diff(starts)
    slots = np.array(sorted(table), dtype=np.int64)
    epochs = np.array([table[s][0] for s in slots.tolist()], dtype=np.int64)
    draws = np.array([table[s][1] for s in slots.tolist()], dtype=np.int64)
    complete_view = len(slots) == global_slots  # only then can a chunk be known to be complete
    per_epoch: dict[str, dict] = {}
    for epoch in range(int(epochs.min()), int(epochs.max()) + 1):
        order = EpochOrder(dataset, seed, epoch)
        # sequences of this epoch read by each partition: all of its stretch once it is in a later epoch
        read = np.zeros(global_slots, dtype=np.int64)
        read[slots] = np.where(epochs > epoch, sizes[slots], np.where(epochs == epoch, draws, 0))
        chunk_ids = order.chunk_order[order.ends > order.starts]  # chunks with train sequences, in order
        begins, ends = order.starts[order.ends > order.starts], order.ends[order.ends > order.starts]
        done = _read_below(ends, starts, read) - _read_below(begins, starts, read) == ends - begins
        in_progress: dict[str, list[int]] = {}
        for slot in slots[(epochs == epoch) & (draws > 0)].tolist():
            last = starts[slot] + read[slot] - 1  # the position of the slot's newest sample
            k = int(np.searchsorted(ends, last, side="right"))
            if not (complete_view and done[k]):
                in_progress.setdefault(str(int(chunk_ids[k])), []).append(int(slot))
        per_epoch[str(epoch)] = {
            "chunks_completed": sorted(int(c) for c in chunk_ids[done]) if complete_view else None,
            "chunks_in_progress": dict(sorted(in_progress.items(), key=lambda item: int(item[0]))),
        }
    lowest = per_epoch[str(int(epochs.min()))]
    return {
        "epoch": int(epochs.min()),
        "chunks_completed": len(lowest["chunks_completed"]) if lowest["chunks_completed"] is not None else None,
        "total_chunks": int(np.count_nonzero(dataset.train_sizes() > 0)),
        "total_train_sequences": num_train,
        "sequences_consumed": int(np.sum(epochs * sizes[slots] + draws)),
        "global_batch": global_slots,
        "partitions": global_slots,
        "slots": len(slots),
        "seed": seed,
        "epochs": per_epoch,
        "state": merge_sampler_states(states),
    }


def _read_below(positions: np.ndarray, starts: np.ndarray, read: np.ndarray) -> np.ndarray:
    """How many positions below each of `positions` have been read, when partition s has read the first
    read[s] positions of its stretch [starts[s], starts[s + 1])."""
    before = np.concatenate([[0], np.cumsum(read)])  # read by the partitions below s
    s = np.clip(np.searchsorted(starts, positions, side="right") - 1, 0, len(read) - 1)
    return before[s] + np.clip(positions - starts[s], 0, read[s])


def _slot_table(state: dict) -> dict[int, tuple[int, int]]:
    slots, epochs, draws = state["slots"], state["epochs"], state["draws"]
    return {int(s): (int(e), int(d)) for s, e, d in zip(slots, epochs, draws, strict=True)}
