"""The KV ledger counts the cells a unified KV cache holds when sequences share their starts."""
from thinktime.engines.kv_ledger import KVLedger


def test_copies_share_cells_and_appends_add_their_own():
    ledger = KVLedger()
    ledger.append(0, list(range(100)))  # a prompt
    for seq in (1, 2, 3):
        ledger.copy(0, seq, 100)  # n samples of it
    assert ledger.cells() == 100
    for seq in (1, 2, 3):
        ledger.append(seq, [7] * 10)
    assert ledger.cells() == 130
    assert ledger.tokens(2) == list(range(100)) + [7] * 10


def test_a_partial_copy_and_truncation_free_only_what_nobody_holds():
    ledger = KVLedger()
    ledger.append(0, list(range(50)))
    ledger.append(0, list(range(50, 80)))
    ledger.copy(0, 1, 60)  # the whole first part, part of the second
    assert ledger.cells() == 80
    ledger.truncate(0, 0)  # the source goes; the copy keeps its 60
    assert ledger.cells() == 60 and 0 not in ledger.seqs
    ledger.append(1, [1, 2])
    assert ledger.cells() == 62
    ledger.truncate(1, 30)
    assert ledger.cells() == 30 and ledger.tokens(1) == list(range(30))


def test_cells_of_a_subset_count_shared_cells_once():
    ledger = KVLedger()
    ledger.append(5, [1] * 40)
    ledger.copy(5, 6, 40)
    ledger.append(6, [2] * 5)
    ledger.copy(6, 7, 42)
    assert ledger.cells([6, 7]) == 45 and ledger.cells([5]) == 40 and ledger.cells([7]) == 42
