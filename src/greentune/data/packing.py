"""Pack tokenised documents into fixed-length rows, and serve them as resumable batches.

`pack` turns documents (ids + loss mask) into three `[N, T]` tensors. Labels are the input
ids themselves with -100 where a token is not a target (masked, padding, or position 0 of a
row): the model shifts them by one internally, as Hugging Face causal LMs do, so position 0
is never predicted and marking it -100 keeps `n_loss_tokens` exact.

- `pack=True`: documents are concatenated (each already ends with EOS) and cut into rows
  of `T = max_seq_len`; a long document simply continues on the next row, and only the
  last row is padded. Attention is not reset at document boundaries (the usual choice: EOS
  tells the model a new document starts).
- `pack=False`: one document per row, truncated to `T` (with a warning), right-padded.

Rows without a single target (e.g. a long prompt cut off before its completion) are
dropped: they would cost compute and teach nothing.

`BatchStream` yields batches in a seeded random order, a fresh permutation per epoch
(`torch.Generator` seeded with `seed + epoch`), forever. `state()`/`load_state()` capture
the position, so a resumed run gets exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from greentune.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PackedData:
    """Rows ready for a causal LM: all three tensors are int64 `[N, T]`."""

    input_ids: torch.Tensor
    labels: torch.Tensor  # input id where the token is a target, else -100
    attention_mask: torch.Tensor  # 1 for real tokens, 0 for padding

    def __post_init__(self):
        assert self.input_ids.dim() == 2, self.input_ids.shape
        assert self.input_ids.shape == self.labels.shape == self.attention_mask.shape

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens: what the model reads."""
        return int(self.attention_mask.sum())

    @property
    def n_loss_tokens(self) -> int:
        """Tokens that are predicted, i.e. that count in the loss."""
        return int((self.labels != IGNORE_INDEX).sum())


def pack(
    samples: Sequence[tuple[Sequence[int], Sequence[bool]]],
    max_seq_len: int,
    pack: bool = True,
    pad_id: int = 0,
) -> PackedData:
    """Documents `(ids, mask)` → `PackedData` of rows `max_seq_len` long (see module docstring)."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    for ids, mask in samples:
        assert len(ids) == len(mask), (len(ids), len(mask))
    T = max_seq_len
    if pack:
        ids = torch.tensor([i for s_ids, _ in samples for i in s_ids], dtype=torch.long)
        target = torch.tensor([m for _, s_mask in samples for m in s_mask], dtype=torch.bool)
        n = -(-len(ids) // T)
        input_ids = torch.full((n * T,), pad_id, dtype=torch.long)
        is_target = torch.zeros(n * T, dtype=torch.bool)
        real = torch.zeros(n * T, dtype=torch.long)
        input_ids[: len(ids)], is_target[: len(ids)], real[: len(ids)] = ids, target, 1
        input_ids, is_target, real = input_ids.view(n, T), is_target.view(n, T), real.view(n, T)
    else:
        n = len(samples)
        input_ids = torch.full((n, T), pad_id, dtype=torch.long)
        is_target = torch.zeros(n, T, dtype=torch.bool)
        real = torch.zeros(n, T, dtype=torch.long)
        truncated = 0
        for r, (s_ids, s_mask) in enumerate(samples):
            k = min(len(s_ids), T)
            truncated += len(s_ids) > T
            input_ids[r, :k] = torch.tensor(s_ids[:k], dtype=torch.long)
            is_target[r, :k] = torch.tensor(s_mask[:k], dtype=torch.bool)
            real[r, :k] = 1
        if truncated:
            log.warning("%d of %d samples are longer than max_seq_len=%d and were truncated", truncated, n, T)
    is_target[:, 0] = False
    keep = is_target.any(dim=1)
    if not bool(keep.all()):
        log.warning("dropped %d of %d rows that have no loss tokens", int((~keep).sum()), n)
        input_ids, is_target, real = input_ids[keep], is_target[keep], real[keep]
    if len(input_ids) == 0:
        raise UserError(
            f"no loss tokens fit in max_seq_len={T} (are the completions beyond the first {T} tokens?)"
        )
    labels = input_ids.masked_fill(~is_target, IGNORE_INDEX)
    return PackedData(input_ids=input_ids, labels=labels, attention_mask=real)


class BatchStream:
    """An endless, seeded, resumable stream of batches `{"input_ids", "labels", "attention_mask"}`.

    Epoch e visits every row once in the order `torch.randperm(N, generator=seeded(seed + e))`,
    `batch_size` rows at a time; the last batch of an epoch holds the `N % batch_size` rows
    left over, if any.
    """

    def __init__(self, data: PackedData, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(data) == 0:
            raise ValueError("BatchStream needs at least one row")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The row permutation of `epoch`: `[N]` int64."""
        if epoch != self._order_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._order_epoch, self._order = epoch, torch.randperm(len(self.data), generator=g)
        return self._order

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = self.order(self.epoch)[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        d = self.data
        return {
            "input_ids": d.input_ids[rows],
            "labels": d.labels[rows],
            "attention_mask": d.attention_mask[rows],
        }

    def state(self) -> dict[str, int]:
        """The position of the next batch: `{"epoch": e, "index": batch index within epoch e}`."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        """Continue from a position returned by `state()` (on the same data, batch size and seed)."""
        epoch, index = state.get("epoch"), state.get("index")
        if not (
            isinstance(epoch, int)
            and isinstance(index, int)
            and epoch >= 0
            and 0 <= index < self.batches_per_epoch
        ):
            raise UserError(
                f"saved data position {state!r} does not fit this data ({self.batches_per_epoch} "
                "batches per epoch); did the training data or batch size change since the checkpoint?"
            )
        self.epoch, self.index = epoch, index
