"""What a unified KV cache holds: each sequence's tokens, and how many cells they take in all.

llama.cpp's unified KV cache shares cells between sequences: copying positions [0, L) of one
sequence into another adds the second sequence to those cells instead of copying them. So n
samples of one prompt, or many prompts after one system prompt, hold that prompt once. To admit
rows without running out of cells mid-decode, the engine must know how many distinct cells are in
use; llama.cpp does not say. This ledger mirrors every copy, append and removal: a sequence is a
list of segments (cells decoded together), a copy shares the source's segments up to its length,
and the cells in use are, per segment, the longest stretch of it that any sequence still holds
(every holder's stretch starts at the segment's start, since copies always start at position 0).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class _Held:
    segment: int  # id of the cells decoded together
    length: int  # how many of them, from the segment's start, this sequence holds


@dataclass
class Sequence:
    tokens: list[int] = field(default_factory=list)  # what its KV holds, position by position
    held: list[_Held] = field(default_factory=list)


class KVLedger:
    def __init__(self) -> None:
        self.seqs: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self._holders: dict[int, int] = {}  # segment -> sequences holding part of it

    def tokens(self, seq: int) -> list[int]:
        return self.seqs[seq].tokens if seq in self.seqs else []

    def append(self, seq: int, tokens: list[int]) -> None:
        """`tokens` were decoded into `seq` after what it holds."""
        entry = self.seqs.setdefault(seq, Sequence())
        last = entry.held[-1] if entry.held else None
        if last is not None and self._holders[last.segment] == 1:
            last.length += len(tokens)  # cells no other sequence holds: grow them rather than add a segment
        else:
            segment = next(self._ids)
            self._holders[segment] = 1
            entry.held.append(_Held(segment, len(tokens)))
        entry.tokens.extend(tokens)

    def copy(self, source: int, target: int, length: int) -> None:
        """`target` (empty) now shares the first `length` cells of `source`."""
        assert not self.seqs.get(target, Sequence()).tokens, "copies go into empty sequences"
        copied, left = Sequence(self.seqs[source].tokens[:length]), length
        for held in self.seqs[source].held:
            if left <= 0:
                break
            take = min(left, held.length)
            copied.held.append(_Held(held.segment, take))
            self._holders[held.segment] += 1
            left -= take
        self.seqs[target] = copied

    def truncate(self, seq: int, length: int) -> None:
        """`seq` keeps only its first `length` positions (0 removes it)."""
        entry = self.seqs.get(seq)
        if entry is None:
            return
        kept, left = [], length
        for held in entry.held:
            if left > 0:
                kept.append(_Held(held.segment, min(left, held.length)))
                left -= held.length
            else:
                self._holders[held.segment] -= 1
                if not self._holders[held.segment]:
                    del self._holders[held.segment]
        entry.held, entry.tokens = kept, entry.tokens[:length]
        if not length:
            del self.seqs[seq]

    def cells(self, seqs=None) -> int:
        """Distinct cells held by `seqs` (all sequences when None)."""
        extent: dict[int, int] = {}
        for seq in self.seqs if seqs is None else seqs:
            for held in self.seqs[seq].held if seq in self.seqs else ():
                extent[held.segment] = max(extent.get(held.segment, 0), held.length)
        return sum(extent.values())

    def clear(self) -> None:
        self.seqs.clear()
        self._holders.clear()
