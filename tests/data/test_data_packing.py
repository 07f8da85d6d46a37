"""Packing shapes and content; batch order determinism; exact resume."""

import pytest
import torch

from greentune.data.packing import IGNORE_INDEX as X
from greentune.data.packing import BatchStream, PackedData, pack
from greentune.errors import UserError

T_, F_ = True, False


def doc(ids, mask):
    return (list(ids), list(mask))


def test_pack_concatenates_and_splits_long_documents():
    samples = [
        doc([1, 10, 11, 2], [F_, T_, T_, T_]),  # bos a b eos
        doc([1, 20, 21, 22, 23, 24, 2], [F_, F_, F_, T_, T_, T_, T_]),
    ]  # bos p p c c c eos
    d = pack(samples, max_seq_len=4, pad_id=0)
    assert d.input_ids.tolist() == [[1, 10, 11, 2], [1, 20, 21, 22], [23, 24, 2, 0]]
    assert d.labels.tolist() == [[X, 10, 11, 2], [X, X, X, 22], [X, 24, 2, X]]  # position 0 is never a target
    assert d.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert d.input_ids.dtype == d.labels.dtype == d.attention_mask.dtype == torch.long
    assert (len(d), d.seq_len, d.n_tokens, d.n_loss_tokens) == (3, 4, 11, 6)


def test_no_pack_truncates_and_right_pads(caplog):
    samples = [doc([1, 10, 2], [F_, T_, T_]), doc([1, 20, 21, 22, 23, 2], [F_, F_, T_, T_, T_, T_])]
    d = pack(samples, max_seq_len=4, pack=False, pad_id=3)
    assert d.input_ids.tolist() == [[1, 10, 2, 3], [1, 20, 21, 22]]
    assert d.labels.tolist() == [[X, 10, 2, X], [X, X, 21, 22]]
    assert d.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert "1 of 2 samples are longer than max_seq_len=4" in caplog.text


def test_rows_without_targets_are_dropped(caplog):
    long_prompt = doc([1, 5, 6, 7, 8, 9, 2], [F_] * 5 + [T_, T_])  # its completion is cut off at T=4
    short = doc([1, 5, 2], [F_, T_, T_])
    d = pack([long_prompt, short], max_seq_len=4, pack=False)
    assert d.input_ids.tolist() == [[1, 5, 2, 0]]
    assert "dropped 1 of 2 rows that have no loss tokens" in caplog.text
    with pytest.raises(UserError, match=r"^no loss tokens fit in max_seq_len=4"):
        pack([long_prompt], max_seq_len=4, pack=False)


def test_packed_rows_without_targets_are_dropped(caplog):
    samples = [doc([1, 5, 6, 7, 8, 9, 2], [F_] * 5 + [T_, T_])]
    d = pack(samples, max_seq_len=4)
    assert d.input_ids.tolist() == [[8, 9, 2, 0]]
    assert d.labels.tolist() == [[X, 9, 2, X]]
    assert "dropped 1 of 2 rows that have no loss tokens" in caplog.text


def rows(n=10, t=3):
    ids = torch.arange(n * t).view(n, t) + 1
    return PackedData(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids))


def take(stream, k):
    return [next(stream) for _ in range(k)]


def test_each_epoch_is_a_seeded_permutation_with_a_partial_last_batch():
    data = rows(10)
    s = BatchStream(data, batch_size=4, seed=3)
    assert s.batches_per_epoch == 3
    epoch0 = take(s, 3)
    assert [len(b["input_ids"]) for b in epoch0] == [4, 4, 2]
    seen = torch.cat([b["input_ids"][:, 0] for b in epoch0])
    assert sorted(seen.tolist()) == data.input_ids[:, 0].tolist()
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(seen, data.input_ids[expected, 0])
    assert s.state() == {"epoch": 1, "index": 0}
    epoch1 = torch.cat([b["input_ids"][:, 0] for b in take(s, 3)])
    assert torch.equal(
        epoch1, data.input_ids[torch.randperm(10, generator=torch.Generator().manual_seed(4)), 0]
    )
    assert not torch.equal(seen, epoch1)


def test_batches_hold_all_three_tensors_of_the_same_rows():
    data = rows(6)
    b = next(BatchStream(data, batch_size=2, seed=0))
    assert set(b) == {"input_ids", "labels", "attention_mask"}
    assert torch.equal(b["labels"], b["input_ids"]) and b["attention_mask"].shape == (2, 3)


def test_same_seed_same_batches_different_seed_different():
    data = rows(20)
    a, b, c = (take(BatchStream(data, 4, seed), 12) for seed in (0, 0, 1))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


@pytest.mark.parametrize("stop", [0, 1, 2, 3, 7])
def test_resume_from_state_gives_the_same_batches(stop):
    data = rows(10)
    straight = take(BatchStream(data, 4, seed=5), 12)
    first = BatchStream(data, 4, seed=5)
    take(first, stop)
    state = dict(first.state())
    resumed = BatchStream(data, 4, seed=5)
    resumed.load_state(state)
    rest = take(resumed, 12 - stop)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(straight[stop:], rest) for k in x)


@pytest.mark.parametrize("state", [{"epoch": 0, "index": 3}, {"epoch": -1, "index": 0}, {"epoch": 0}, {}])
def test_load_state_that_does_not_fit_is_refused(state):
    s = BatchStream(rows(10), 4, seed=0)
    with pytest.raises(UserError, match=r"does not fit this data \(3 batches per epoch\)"):
        s.load_state(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_seq_len must be at least 2"):
        pack([doc([1, 2], [F_, T_])], max_seq_len=1)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        BatchStream(rows(2), 0)
