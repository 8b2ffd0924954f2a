"""From a manifest to padded ``Batch``es: dataset, sampler, augmentation.

- ``BucketSampler`` groups utterances of similar duration, so that padding
  is small, into batches of at most ``max_batch_sec`` padded audio seconds
  (batch size x longest utterance, which bounds the total audio seconds and
  the memory); seeded shuffling per epoch, sharding across ranks (every rank
  gets the same number of batches), and mid-epoch resume.
- ``UtteranceDataset`` computes fbank in ``__getitem__`` (in DataLoader
  workers), with an optional on-disk cache, and in training applies speed
  perturbation and SpecAugment, each seeded from (seed, epoch, utterance id)
  so that a run is reproducible whatever the number of workers.
- ``Collate`` pads to a ``Batch``. Items that cannot be used are listed in
  ``Batch.skipped`` as ``Skip(id, reason, detail)``, never dropped silently.

Shapes: F feature frames, C mel bins, U tokens, B utterances.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from streamkd.atomic import atomic_open
from streamkd.audio import load_utterance, resample
from streamkd.config import DataConfig, SpecAugmentConfig, to_dict
from streamkd.errors import AudioError, DataError, TokenizerError
from streamkd.features import Fbank
from streamkd.manifest import Utterance, read_manifest
from streamkd.model.subsampling import Conv2dSubsampling4
from streamkd.types import Batch, Skip

__all__ = [
    "BucketSampler",
    "UtteranceDataset",
    "Collate",
    "make_dataloader",
    "spec_augment",
    "random_eq",
    "speed_perturb",
    "choose_speed",
    "item_rng",
]

# Why an item is left out: the keys skip counts are reported by.
EMPTY_TEXT = "empty transcript"
TOO_LONG = "longer than data.max_utt_sec"
TOO_SHORT = "too short for its transcript"
_ERROR_REASONS = ((AudioError, "unusable audio"), (TokenizerError, "transcript the tokenizer cannot encode"),
                  (DataError, "unusable item"))


def _reason_of(err: DataError) -> str:
    return next(reason for cls, reason in _ERROR_REASONS if isinstance(err, cls))


def item_rng(seed: int, epoch: int, utt_id: str, purpose: str) -> np.random.Generator:
    """A generator that depends only on its arguments (Python's hash() is
    salted per process, so a cryptographic hash keeps workers reproducible)."""
    digest = hashlib.blake2b(f"{seed}|{epoch}|{utt_id}|{purpose}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def choose_speed(factors: Sequence[float], seed: int, epoch: int, utt_id: str) -> float:
    """The speed factor of one item in one epoch (1.0 when ``factors`` is empty)."""
    if not factors:
        return 1.0
    return float(factors[int(item_rng(seed, epoch, utt_id, "speed").integers(len(factors)))])


def speed_perturb(samples: np.ndarray, factor: float, sample_rate: int) -> np.ndarray:
    """Play (N,) samples ``factor`` times faster: (about N / factor,) samples,
    pitch shifted with the tempo as in Kaldi's speed perturbation."""
    if factor <= 0:
        raise DataError(f"speed factor must be > 0, got {factor}")
    # Reinterpreting the samples as recorded at sample_rate * factor and
    # resampling to sample_rate shortens them by exactly the factor.
    return resample(samples, sample_rate * factor, sample_rate)


def spec_augment(feats: torch.Tensor, cfg: SpecAugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """(F, C) -> (F, C) copy with frequency and time bands masked.

    Masked cells get the utterance's mean value: features are raw log-mel
    (CMVN is applied in the model), where 0 would be a loud, unnatural value.
    """
    out = feats.clone()
    num_frames, num_bins = out.shape
    fill = float(out.mean()) if out.numel() else 0.0
    for _ in range(cfg.num_freq_masks):
        width = int(rng.integers(0, min(cfg.max_freq_width, num_bins) + 1))
        start = int(rng.integers(0, num_bins - width + 1))
        out[:, start:start + width] = fill
    max_width = int(cfg.max_time_frac * num_frames)
    for _ in range(cfg.num_time_masks):
        width = int(rng.integers(0, max_width + 1))
        start = int(rng.integers(0, num_frames - width + 1))
        out[start:start + width, :] = fill
    return out


_EQ_TERMS = 4  # cosine terms of the random EQ curve: smooth across the bins


def random_eq(feats: torch.Tensor, max_db: float, rng: np.random.Generator) -> torch.Tensor:
    """(F, C) -> (F, C): log-mel features of the same speech through a random
    smooth filter. Bin c (of C) gains g(c) = sum_k a_k cos(pi k c / (C - 1)),
    k = 1..4, a_k ~ U(-1, 1), scaled so that max |g| is ``max_db`` times
    u ~ U(0, 1) dB; in the features' natural-log power units that is
    g * ln(10) / 10 added to every frame. Applied before CMVN, like the
    differences between voices and channels it imitates."""
    num_bins = feats.shape[1]
    grid = np.pi * np.arange(num_bins) / max(1, num_bins - 1)
    curve = sum(rng.uniform(-1.0, 1.0) * np.cos(k * grid) for k in range(1, _EQ_TERMS + 1))
    peak = float(np.abs(curve).max())
    gain_db = curve * (max_db * rng.uniform() / peak) if peak > 0 else curve * 0.0
    return feats + torch.as_tensor(gain_db * np.log(10.0) / 10.0, dtype=feats.dtype)


class BucketSampler(Sampler):
    """Duration-bucketed batch sampler.

    Iterating yields, per batch, a list of ``(utterance index, epoch)``: the
    epoch travels with the indices so that DataLoader workers seed their
    augmentation from it. ``batches(epoch)`` gives the plain index lists.
    Utterances over ``max_utt_sec`` are left out and listed in ``skipped``.
    """

    def __init__(self, durations: Sequence[float], ids: Sequence[str], *, max_batch_sec: float,
                 max_utt_sec: float, num_buckets: int = 10, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if max_batch_sec <= 0 or num_buckets < 1:
            raise DataError(f"max_batch_sec must be > 0 and num_buckets >= 1, got {max_batch_sec}, {num_buckets}")
        self.durations = [float(d) for d in durations]
        self.ids = list(ids)
        self.max_batch_sec, self.num_buckets = float(max_batch_sec), int(num_buckets)
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, int(seed), rank, world_size
        self.skipped = [Skip(self.ids[i], TOO_LONG, f"{d:.2f} s > {max_utt_sec} s")
                        for i, d in enumerate(self.durations) if d > max_utt_sec]
        kept = [i for i, d in enumerate(self.durations) if d <= max_utt_sec]
        if len(kept) < world_size:
            raise DataError(f"only {len(kept)} utterances (of {len(self.ids)}) are usable, fewer than "
                            f"world_size={world_size} ranks")
        kept.sort(key=lambda i: (self.durations[i], self.ids[i]))
        self._buckets = [list(b) for b in np.array_split(np.array(kept, dtype=np.int64), num_buckets) if len(b)]
        self.epoch = 0
        self._done = 0  # batches of this epoch handed out on this rank
        self._resume_from = 0  # set by load_state_dict, used by the next __iter__
        self._cache: tuple[int, list[list[int]]] = (-1, [])

    def _pack(self, bucket: list[int]) -> list[list[int]]:
        """Greedy batches of at most max_batch_sec padded seconds (a single
        utterance longer than that still gets a batch of its own)."""
        batches, current, longest = [], [], 0.0
        for i in bucket:
            new_longest = max(longest, self.durations[i])
            if current and new_longest * (len(current) + 1) > self.max_batch_sec:
                batches.append(current)
                current, new_longest = [], self.durations[i]
            current.append(i)
            longest = new_longest
        if current:
            batches.append(current)
        return batches

    def _all_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of ``epoch``, a multiple of world_size of them."""
        rng = item_rng(self.seed, epoch, "", "sampler")
        batches = []
        for bucket in self._buckets:
            bucket = list(bucket)
            if self.shuffle:
                rng.shuffle(bucket)
            batches.extend(self._pack(bucket))
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[k] for k in order]
        # Equal batch counts per rank without dropping anything: halve the
        # largest batches until the count divides evenly. Only when every
        # batch is a single utterance are a few repeated (as
        # DistributedSampler pads).
        while len(batches) % self.world_size:
            k = max(range(len(batches)), key=lambda j: len(batches[j]))
            if len(batches[k]) == 1:
                batches += batches[: self.world_size - len(batches) % self.world_size]
                break
            half = len(batches[k]) // 2
            batches[k:k + 1] = [batches[k][:half], batches[k][half:]]
        return batches

    def batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        """This rank's batches of ``epoch`` (default: the current one) as index lists."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache[0] != epoch:
            self._cache = (epoch, self._all_batches(epoch)[self.rank::self.world_size])
        return self._cache[1]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle. A resume position loaded for this same
        epoch is kept; any other epoch starts from its first batch."""
        if epoch != self.epoch:
            self.epoch, self._done, self._resume_from = int(epoch), 0, 0

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batches = self.epoch, self.batches()
        start, self._resume_from = self._resume_from, 0
        self._done = start
        for k in range(start, len(batches)):
            self._done = k + 1
            yield [(i, epoch) for i in batches[k]]

    def state_dict(self, batches_done: Optional[int] = None) -> dict[str, Any]:
        """Position in the epoch. The count is of batches handed to the
        DataLoader, which with workers prefetches ahead of the trainer: pass
        ``batches_done`` (batches the trainer consumed this epoch) to be exact."""
        return {"epoch": self.epoch, "batches_done": self._done if batches_done is None else int(batches_done),
                "seed": self.seed, "world_size": self.world_size, "num_batches": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields the epoch's remaining batches."""
        for key in ("seed", "world_size"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"sampler state has {key}={state.get(key)!r} but this run has "
                                f"{getattr(self, key)!r}; resume with the same {key}")
        self.epoch = int(state["epoch"])
        self._done = self._resume_from = int(state["batches_done"])


@dataclass
class _Item:
    """One utterance, ready (feats, tokens) or skipped (why)."""

    id: str
    text: str
    feats: Optional[torch.Tensor] = None  # (F, C)
    tokens: Optional[list[int]] = None
    skip: Optional[Skip] = None


class UtteranceDataset(Dataset):
    """``dataset[(index, epoch)]`` (or ``dataset[index]``: epoch 0) -> one
    utterance's fbank (F, C) and token ids, or the reason it is unusable."""

    def __init__(self, utts: Sequence[Utterance], data_cfg: DataConfig, tokenizer, *,
                 train: bool, seed: int = 0) -> None:
        self.utts = list(utts)
        self.cfg, self.tokenizer, self.train, self.seed = data_cfg, tokenizer, train, int(seed)
        self.fbank = Fbank(data_cfg.features)
        self._feat_key = json.dumps(to_dict(data_cfg.features), sort_keys=True)

    def __len__(self) -> int:
        return len(self.utts)

    def __getitem__(self, key: int | tuple[int, int]) -> _Item:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        utt = self.utts[index]
        item = _Item(utt.id, utt.text)
        if not utt.text.strip():
            item.skip = Skip(utt.id, EMPTY_TEXT)
            return item
        if utt.duration > self.cfg.max_utt_sec:
            item.skip = Skip(utt.id, TOO_LONG, f"{utt.duration:.2f} s > {self.cfg.max_utt_sec} s")
            return item
        try:
            tokens = self.tokenizer.encode(utt.text)
            factor = choose_speed(self.cfg.speed_perturb, self.seed, epoch, utt.id) if self.train else 1.0
            feats = self._features(utt, factor)
        except DataError as err:  # AudioError and TokenizerError included
            item.skip = Skip(utt.id, _reason_of(err), str(err))
            return item
        enc_frames = Conv2dSubsampling4.output_length(feats.shape[0])
        if enc_frames < len(tokens):  # CTC needs a frame per token
            item.skip = Skip(utt.id, TOO_SHORT, f"{len(tokens)} tokens, but {feats.shape[0]} feature frames "
                                                f"give {enc_frames} encoder frames")
            return item
        if self.train and self.cfg.spec_augment.enabled:
            if self.cfg.spec_augment.eq_db > 0:  # its own draws: runs without it stay as they were
                feats = random_eq(feats, self.cfg.spec_augment.eq_db, item_rng(self.seed, epoch, utt.id, "eq"))
            feats = spec_augment(feats, self.cfg.spec_augment, item_rng(self.seed, epoch, utt.id, "specaug"))
        item.feats, item.tokens = feats, tokens
        return item

    def _features(self, utt: Utterance, factor: float) -> torch.Tensor:
        """(F, C) fbank of the utterance at speed ``factor``, from the cache if there."""
        cache = self._cache_path(utt, factor)
        if cache is not None and cache.is_file():
            try:
                return torch.from_numpy(np.load(cache))
            except (OSError, ValueError):
                pass  # a damaged entry is recomputed and rewritten below
        rate = self.cfg.features.sample_rate
        samples = load_utterance(utt, rate)
        if factor != 1.0:
            samples = speed_perturb(samples, factor, rate)
        feats = self.fbank.compute(samples)
        if cache is not None:
            # Concurrent workers may race; os.replace is atomic, so the last identical copy wins.
            with atomic_open(cache, "wb") as f:
                np.save(f, feats.numpy())
        return feats

    def _cache_path(self, utt: Utterance, factor: float) -> Optional[Path]:
        if not self.cfg.feature_cache:
            return None
        try:
            stat = os.stat(utt.audio_path)
        except OSError:
            return None  # load_utterance will report the missing file
        # Size and mtime too, so a re-generated audio file is not served stale features.
        key = json.dumps([str(utt.audio_path), utt.extra.get("offset"), utt.duration, stat.st_size,
                          stat.st_mtime_ns, factor, self._feat_key])
        digest = hashlib.sha256(key.encode()).hexdigest()
        return Path(self.cfg.feature_cache) / digest[:2] / f"{digest}.npy"


class Collate:
    """Pads usable items to a ``Batch`` (feats with 0, tokens with -1) and
    lists the others in ``Batch.skipped``. A class, so workers can pickle it."""

    def __init__(self, num_bins: int) -> None:
        self.num_bins = num_bins

    def __call__(self, items: list[_Item]) -> Batch:
        good = [it for it in items if it.skip is None]
        skipped = [it.skip for it in items if it.skip is not None]
        feat_lens = torch.tensor([it.feats.shape[0] for it in good], dtype=torch.int64)
        token_lens = torch.tensor([len(it.tokens) for it in good], dtype=torch.int64)
        feats = torch.zeros(len(good), int(feat_lens.max()) if good else 0, self.num_bins)  # (B, F, C)
        tokens = torch.full((len(good), int(token_lens.max()) if good else 0), -1, dtype=torch.int64)  # (B, U)
        for b, it in enumerate(good):
            feats[b, : it.feats.shape[0]] = it.feats
            tokens[b, : len(it.tokens)] = torch.tensor(it.tokens, dtype=torch.int64)
        return Batch(ids=[it.id for it in good], feats=feats, feat_lens=feat_lens, tokens=tokens,
                     token_lens=token_lens, texts=[it.text for it in good], skipped=skipped)


def _worker_init(_worker_id: int) -> None:
    # Feature extraction is single-threaded; torch threads per worker would
    # only oversubscribe the cores the trainer needs.
    torch.set_num_threads(1)


def make_dataloader(data_cfg: DataConfig, manifest_path: str | Path, tokenizer, *, train: bool,
                    seed: int, rank: int = 0, world_size: int = 1) -> tuple[DataLoader, BucketSampler]:
    """A DataLoader of ``Batch``es over ``manifest_path`` and its sampler
    (call ``sampler.set_epoch(e)`` before each epoch). ``train`` shuffles and
    augments; otherwise the order is fixed and features are clean."""
    utts = read_manifest(manifest_path)
    if not utts:
        raise DataError(f"{manifest_path}: the manifest holds no utterances")
    sampler = BucketSampler(
        [u.duration for u in utts], [u.id for u in utts], max_batch_sec=data_cfg.max_batch_sec,
        max_utt_sec=data_cfg.max_utt_sec, num_buckets=data_cfg.num_buckets, shuffle=train,
        seed=seed, rank=rank, world_size=world_size,
    )
    dataset = UtteranceDataset(utts, data_cfg, tokenizer, train=train, seed=seed)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=data_cfg.num_workers,
        collate_fn=Collate(data_cfg.features.num_mel_bins),
        worker_init_fn=_worker_init if data_cfg.num_workers > 0 else None,
    )
    return loader, sampler
