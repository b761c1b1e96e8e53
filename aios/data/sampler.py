"""The chunk sampler: a deterministic, resumable, shardable order over the train sequences.

Epoch order. The order of epoch e is a pure function of (seed, e, the manifest's chunk sizes): the chunk
ids are permuted with `np.random.default_rng([seed, e])`, the sequences inside chunk c are shuffled with
`np.random.default_rng([seed, e, c])`, and the chunks' train sequences are concatenated in permuted order.
Only train sequences take part: a chunk cut by the held-out tail contributes its train part, held-out
sequences never appear. Positions 0..num_train-1 index this order; it is computed lazily, one chunk at a
time, so a rank opens only the chunk files its positions fall in.

Slots. A global step has G = micro_batch * grad_accum * world_size rows, the slots. Rank r's row `row` of
micro-step m is slot s = (m * world_size + r) * micro_batch + row. The j-th draw of slot s in an epoch is
position j * G + s. When every slot draws once per step, step j consumes exactly positions
[j * G, (j + 1) * G) and rank r's micro-step m takes [j*G + (m*W + r)*b, j*G + (m*W + r + 1)*b): disjoint
across ranks, together the global batch. The order depends only on G, so changing the world size (or the
micro-batch / accumulation split) while keeping G keeps it.

ACT streaming. Only halted rows take a new sample: `draw(slots)` draws for just those slots and advances
only their counters. The state is one (epoch, draws) pair per slot this rank owns; the global state is the
union over ranks (`merge_sampler_states`).

End of epoch. A slot whose next position j * G + s is >= num_train has finished the epoch. With
`iterate=False`, `draw` then reports exhausted=True, draws nothing and moves no counter (end of data: the
loop stops). With `iterate=True` that slot continues at once in epoch e + 1, at position s of the new order
(epochs are per slot). Requires num_train >= G, so every slot has at least one position per epoch.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from aios.data.dataset import PreparedDataset
from aios.errors import AiosError

STATE_FORMAT = 1
_INNER_ORDERS_CACHED = 64


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

    def chunks_completed(self, cursor: int) -> int:
        """Chunks (with train sequences) of this order whose positions all lie below `cursor`."""
        nonempty = self.train_sizes[self.chunk_order] > 0
        return int(np.count_nonzero(nonempty & (self.ends <= cursor)))

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
        # This rank's slots, in local order (micro-step major): (grad_accum * micro_batch,)
        self.slot_ids = np.concatenate([self.slots_for(m) for m in range(grad_accum)])
        self.epochs = np.zeros(len(self.slot_ids), dtype=np.int64)
        self.draws = np.zeros(len(self.slot_ids), dtype=np.int64)  # draws of each slot in its epoch
        self._orders: OrderedDict[int, EpochOrder] = OrderedDict()

    def slots_for(self, micro_step: int) -> np.ndarray:
        """Global slot ids of this rank's rows in `micro_step`: (micro_batch,)."""
        first = (micro_step * self.world_size + self.rank) * self.micro_batch
        return np.arange(first, first + self.micro_batch, dtype=np.int64)

    def draw(self, slots: np.ndarray) -> tuple[np.ndarray, bool]:
        """The next sample of each slot: ((len(slots), window) int64, exhausted).

        exhausted=True (only with iterate=False) means some slot has finished the epoch; then nothing is
        drawn and no counter moves.
        """
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        local = self._local_index(slots)
        positions = self.draws[local] * self.global_slots + slots
        finished = positions >= self.num_train
        if finished.any():
            if not self.iterate:
                return np.empty((0, self.dataset.window), dtype=np.int64), True
            self.epochs[local[finished]] += 1
            self.draws[local[finished]] = 0
            positions[finished] = slots[finished]
        ids = np.empty_like(positions)
        epochs = self.epochs[local]
        for epoch in np.unique(epochs):
            where = epochs == epoch
            ids[where] = self._order(int(epoch)).global_ids(positions[where])
        self.draws[local] += 1
        return self.dataset.get(ids), False

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
        per_step = self.world_size * self.micro_batch
        micro_step, within = np.divmod(slots, per_step)
        rank, row = np.divmod(within, self.micro_batch)
        if (
            np.any(slots < 0)
            or np.any(micro_step >= self.grad_accum)
            or np.any(rank != self.rank)
            or len(np.unique(slots)) != len(slots)
        ):
            raise ValueError(f"slots {slots.tolist()} are not distinct slots of rank {self.rank}")
        return micro_step * self.micro_batch + row

    def _order(self, epoch: int) -> EpochOrder:
        order = self._orders.get(epoch)
        if order is None:
            order = self._orders[epoch] = EpochOrder(self.dataset, self.seed, epoch)
            if len(self._orders) > 2:  # slots are usually within one epoch of each other
                self._orders.popitem(last=False)
        return order


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

    epoch: the lowest epoch of any slot; cursor: the length of the prefix of that epoch's order that every
    slot has consumed (a slot already in a later epoch has consumed all of it); chunks_completed: chunks of
    that epoch whose train sequences all lie below the cursor; sequences_consumed: draws over all epochs.
    """
    table: dict[int, tuple[int, int]] = {}
    for state in states:
        table.update(_slot_table(state))
    global_slots = states[0]["global_slots"]
    num_train = dataset.num_train
    slots = np.array(sorted(table), dtype=np.int64)
    epochs = np.array([table[s][0] for s in slots.tolist()], dtype=np.int64)
    draws = np.array([table[s][1] for s in slots.tolist()], dtype=np.int64)
    epoch = int(epochs.min())
    in_epoch = epochs == epoch
    cursor = int(np.min(draws[in_epoch] * global_slots + slots[in_epoch]))
    cursor = min(cursor, num_train)
    per_epoch = (num_train - slots + global_slots - 1) // global_slots  # positions of each slot per epoch
    order = EpochOrder(dataset, seed, epoch)
    return {
        "epoch": epoch,
        "cursor": cursor,
        "chunks_completed": order.chunks_completed(cursor),
        "total_chunks": int(np.count_nonzero(dataset.train_sizes() > 0)),
        "total_train_sequences": num_train,
        "sequences_consumed": int(np.sum(epochs * per_epoch + draws)),
        "global_batch": int(global_slots),
        "slots": len(slots),
        "seed": seed,
    }


def _slot_table(state: dict) -> dict[int, tuple[int, int]]:
    slots, epochs, draws = state["slots"], state["epochs"], state["draws"]
    return {int(s): (int(e), int(d)) for s, e, d in zip(slots, epochs, draws, strict=True)}
