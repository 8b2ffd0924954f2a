"""Attention masks against brute-force loop oracles."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkd.model.masks import (
    chunk_attend_mask,
    combine_with_valid,
    roll_cache_valid_mask,
    stream_attend_mask,
)
from streamkd.types import ChunkConfig


def _oracle_chunk_mask(T, chunk_frames, left_chunks):
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        ci = i // chunk_frames
        for j in range(T):
            cj = j // chunk_frames
            mask[i, j] = cj <= ci and (left_chunks is None or cj >= ci - left_chunks)
    return mask


@settings(max_examples=150, deadline=None)
@given(
    T=st.integers(0, 40),
    chunk_frames=st.integers(1, 12),
    left_chunks=st.one_of(st.none(), st.integers(0, 6)),
)
def test_chunk_mask_matches_oracle(T, chunk_frames, left_chunks):
    got = chunk_attend_mask(T, ChunkConfig(chunk_frames, left_chunks))
    assert got.dtype == torch.bool and got.shape == (T, T)
    assert torch.equal(got, _oracle_chunk_mask(T, chunk_frames, left_chunks))


@given(T=st.integers(0, 30))
def test_full_context_mask_is_all_true(T):
    assert torch.equal(chunk_attend_mask(T, None), torch.ones(T, T, dtype=torch.bool))


def test_chunk_mask_sees_own_chunk_and_no_future():
    mask = chunk_attend_mask(10, ChunkConfig(3, 1))
    assert mask[4, 5] and mask[4, 3] and mask[4, 0]  # own chunk (3..5) and one to the left (0..2)
    assert not mask[4, 6] and not mask[7, 2]  # the next chunk; two chunks back


@settings(max_examples=50, deadline=None)
@given(T=st.integers(1, 12), lens=st.lists(st.integers(0, 12), min_size=1, max_size=4), cf=st.integers(1, 5))
def test_combine_with_valid_matches_oracle(T, lens, cf):
    lens = [min(n, T) for n in lens]
    key_valid = torch.tensor([[j < n for j in range(T)] for n in lens])
    attend = chunk_attend_mask(T, ChunkConfig(cf, 1))
    got = combine_with_valid(attend, key_valid)
    assert got.shape == (len(lens), T, T)
    for b, n in enumerate(lens):
        for i in range(T):
            for j in range(T):
                assert bool(got[b, i, j]) == (bool(attend[i, j]) and j < n)
    assert torch.equal(combine_with_valid(attend[None], key_valid), got)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), T_cache=st.integers(0, 8), n=st.integers(1, 6), B=st.integers(1, 3))
def test_stream_mask_and_roll_match_oracle(data, T_cache, n, B):
    valid = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=T_cache, max_size=T_cache),
                                            min_size=B, max_size=B))).reshape(B, T_cache)
    got = stream_attend_mask(valid, n)
    assert got.shape == (B, n, T_cache + n)
    for b in range(B):
        for i in range(n):
            for j in range(T_cache + n):
                assert bool(got[b, i, j]) == (bool(valid[b, j]) if j < T_cache else True)
    rolled = roll_cache_valid_mask(valid, n)
    expected = [valid[b].tolist() + [True] * n for b in range(B)]
    assert rolled.tolist() == [row[len(row) - T_cache:] if T_cache else [] for row in expected]
