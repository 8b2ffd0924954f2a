import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch

from conftest import synth
from streamkd.audio import load_audio
from streamkd.cli import main
from streamkd.config import DataConfig, FeatureConfig, SpecAugmentConfig, TokenizerConfig
from streamkd.dataset import (BucketSampler, Collate, UtteranceDataset, choose_speed,
                              item_rng, make_dataloader, spec_augment, speed_perturb)
from streamkd.errors import DataError
from streamkd.features import Fbank, load_cmvn
from streamkd.lang import check_lang, prepare_lang, read_lang_info
from streamkd.manifest import Utterance, write_manifest
from streamkd.model.subsampling import Conv2dSubsampling4
from streamkd.tokenizer import CharTokenizer, load_tokenizer
from streamkd.types import Batch

NO_AUG = SpecAugmentConfig(enabled=False)


def _durations(n, seed=0):
    return list(np.random.default_rng(seed).uniform(0.5, 6.0, n))


def _sampler(n=60, seed=0, **kw):
    args = dict(max_batch_sec=12.0, max_utt_sec=5.5, num_buckets=4, shuffle=True, seed=seed)
    args.update(kw)
    return BucketSampler(_durations(n), [f"u{i}" for i in range(n)], **args)


def test_sampler_batches_respect_limits_and_cover_every_kept_utterance():
    s = _sampler()
    durs = s.durations
    kept = sorted(i for i, d in enumerate(durs) if d <= 5.5)
    assert {skip.id for skip in s.skipped} == {f"u{i}" for i, d in enumerate(durs) if d > 5.5}
    assert all(skip.reason == "longer than data.max_utt_sec" and skip.detail.endswith("> 5.5 s")
               for skip in s.skipped)
    for epoch in range(3):
        batches = s.batches(epoch)
        assert sorted(i for b in batches for i in b) == kept
        for b in batches:
            assert len(b) == 1 or max(durs[i] for i in b) * len(b) <= 12.0
            assert any(set(b) <= set(bucket) for bucket in s._buckets)  # similar durations


def test_sampler_is_seeded_per_epoch():
    assert _sampler().batches(0) == _sampler().batches(0)
    assert _sampler().batches(0) != _sampler().batches(1)
    assert _sampler().batches(0) != _sampler(seed=1).batches(0)
    fixed = _sampler(shuffle=False)
    assert fixed.batches(0) == fixed.batches(5)
    s = _sampler()
    s.set_epoch(2)
    assert [[i for i, _ in b] for b in s] == _sampler().batches(2)
    assert all(e == 2 for b in s for _, e in b)  # the epoch travels with the indices


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_shards_are_disjoint_complete_and_equal(world_size):
    ranks = [_sampler(rank=r, world_size=world_size) for r in range(world_size)]
    single = _sampler()
    for epoch in (0, 1):
        shards = [r.batches(epoch) for r in ranks]
        assert len({len(sh) for sh in shards}) == 1
        flat = [i for sh in shards for b in sh for i in b]
        assert len(flat) == len(set(flat))
        assert sorted(flat) == sorted(i for b in single.batches(epoch) for i in b)


def test_sharding_single_utterance_batches_pads_by_repeating():
    ranks = [BucketSampler([1.0] * 5, list("abcde"), max_batch_sec=1.0, max_utt_sec=2, num_buckets=1,
                           rank=r, world_size=2) for r in range(2)]
    shards = [r.batches(0) for r in ranks]
    assert len(shards[0]) == len(shards[1]) == 3
    assert sorted({b[0] for sh in shards for b in sh}) == list(range(5))
    with pytest.raises(DataError, match="fewer than world_size"):
        BucketSampler([1.0], ["a"], max_batch_sec=5, max_utt_sec=2, world_size=2, rank=1)


def test_resume_mid_epoch_yields_exactly_the_rest():
    s = _sampler()
    s.set_epoch(3)
    it = iter(s)
    first = [next(it) for _ in range(4)]
    state = json.loads(json.dumps(s.state_dict()))  # checkpoint-safe
    assert state["epoch"] == 3 and state["batches_done"] == 4
    rest_expected = list(it)
    resumed = _sampler()
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the trainer's loop calls this again; the position stays
    assert list(resumed) == rest_expected
    assert first + rest_expected == list(_sampler_at(3))
    assert len(list(resumed)) == len(s)  # a later pass over the epoch is whole again
    resumed.set_epoch(4)
    assert [[i for i, _ in b] for b in resumed] == _sampler().batches(4)
    assert _sampler().state_dict(batches_done=2)["batches_done"] == 2
    with pytest.raises(DataError, match="seed"):
        _sampler(seed=9).load_state_dict(state)


def _sampler_at(epoch):
    s = _sampler()
    s.set_epoch(epoch)
    return s


def _cfg(**kw):
    base = dict(max_batch_sec=5.0, max_utt_sec=10.0, num_buckets=2, num_workers=0, spec_augment=NO_AUG)
    base.update(kw)
    return DataConfig(**base)


def _char_tok(utts):
    return CharTokenizer.train([u.text for u in utts])


def test_loader_batches_are_padded_and_match_fbank(tiny_manifest):
    manifest, utts = tiny_manifest(10)
    tok = _char_tok(utts)
    loader, sampler = make_dataloader(_cfg(), manifest, tok, train=False, seed=0)
    by_id = {u.id: u for u in utts}
    fbank = Fbank(FeatureConfig())
    seen = []
    for batch in loader:
        assert isinstance(batch, Batch) and batch.skipped == []
        assert batch.feats.shape[0] == len(batch) and batch.feats.shape[2] == 80
        for b, uid in enumerate(batch.ids):
            ref = fbank.compute(load_audio(by_id[uid].audio_path))
            n, u = int(batch.feat_lens[b]), int(batch.token_lens[b])
            assert n == ref.shape[0] and torch.equal(batch.feats[b, :n], ref)
            assert (batch.feats[b, n:] == 0).all()
            assert batch.tokens[b, :u].tolist() == tok.encode(by_id[uid].text)
            assert (batch.tokens[b, u:] == -1).all()
            assert batch.texts[b] == by_id[uid].text
        seen += batch.ids
    assert sorted(seen) == sorted(by_id) and len(loader) == len(sampler)


def test_bad_items_are_skipped_with_reasons(tmp_path, tiny_manifest):
    _, utts = tiny_manifest(3)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFFjunk")
    tiny = tmp_path / "tiny.wav"
    import soundfile as sf
    sf.write(str(tiny), synth(0.1), 16000)  # 10 frames -> 1 encoder frame
    bad = [
        Utterance("missing", str(tmp_path / "gone.wav"), 1.0, "hello"),
        Utterance("corrupt", str(tmp_path / "corrupt.wav"), 1.0, "hello"),
        Utterance("empty_text", utts[0].audio, 1.0, "  "),
        Utterance("odd_chars", utts[0].audio, 1.0, "héllo"),
        Utterance("short", str(tiny), 0.1, "hello world"),
        Utterance("too_long", utts[0].audio, 30.0, "hello"),
    ]
    manifest = tmp_path / "bad.jsonl"
    write_manifest(manifest, utts + bad)
    tok = CharTokenizer.train([u.text for u in utts] + ["hello world"])
    loader, sampler = make_dataloader(_cfg(max_batch_sec=100.0), manifest, tok, train=False, seed=0)
    assert [(s.id, s.reason) for s in sampler.skipped] == [("too_long", "longer than data.max_utt_sec")]
    batches = list(loader)
    skipped = {s.id: s for b in batches for s in b.skipped}
    assert sorted(skipped) == ["corrupt", "empty_text", "missing", "odd_chars", "short"]
    assert {s.reason for s in skipped.values()} == {
        "unusable audio", "empty transcript", "transcript the tokenizer cannot encode", "too short for its transcript"}
    assert skipped["missing"].reason == skipped["corrupt"].reason == "unusable audio"
    assert "does not exist" in skipped["missing"].detail and "corrupt.wav" in skipped["corrupt"].detail
    assert skipped["empty_text"].reason == "empty transcript" and "'é'" in skipped["odd_chars"].detail
    assert skipped["short"].detail.startswith("11 tokens, but 10 feature frames give 1 encoder frames")
    assert sorted(i for b in batches for i in b.ids) == sorted(u.id for u in utts)


def test_all_skipped_batch_is_empty_but_well_formed():
    batch = Collate(80)([])
    assert len(batch) == 0 and batch.feats.shape == (0, 0, 80) and batch.tokens.shape == (0, 0)


def test_spec_augment_is_reproducible_per_seed_epoch_and_id():
    feats = torch.randn(200, 80)
    cfg = SpecAugmentConfig(num_freq_masks=2, max_freq_width=15, num_time_masks=2, max_time_frac=0.1)
    a = spec_augment(feats, cfg, item_rng(0, 1, "u1", "specaug"))
    b = spec_augment(feats, cfg, item_rng(0, 1, "u1", "specaug"))
    assert torch.equal(a, b) and not torch.equal(feats, a)
    assert not torch.equal(a, spec_augment(feats, cfg, item_rng(0, 2, "u1", "specaug")))
    changed = a != feats
    assert torch.equal(a[changed], torch.full_like(a[changed], float(feats.mean())))
    # masks are whole bands: every changed cell lies in a masked row or column
    rows, cols = changed.all(dim=1), changed.all(dim=0)
    assert (changed & ~rows[:, None] & ~cols[None, :]).sum() == 0


def test_random_eq_is_a_smooth_bounded_gain_per_bin_and_off_by_default(tiny_manifest):
    from streamkd.dataset import random_eq

    feats = torch.randn(50, 80)
    out = random_eq(feats, 6.0, item_rng(0, 1, "u1", "eq"))
    gain = out - feats
    assert torch.allclose(gain, gain[:1].expand_as(gain), atol=1e-6)  # the same filter on every frame
    gain_db = gain[0].double().numpy() * 10 / np.log(10.0)
    assert 0 < np.abs(gain_db).max() <= 6.0 + 1e-6
    assert np.abs(np.diff(gain_db)).max() < 6.0 * 4 * np.pi / 79  # smooth: bounded slope across bins
    assert torch.equal(out, random_eq(feats, 6.0, item_rng(0, 1, "u1", "eq")))
    # eq_db 0 (the default) leaves the augmented features exactly as before the option existed
    _, utts = tiny_manifest(1)
    tok = _char_tok(utts)
    plain = UtteranceDataset(utts, _cfg(spec_augment=SpecAugmentConfig()), tok, train=True, seed=5)[(0, 1)].feats
    raw = UtteranceDataset(utts, _cfg(spec_augment=NO_AUG), tok, train=True, seed=5)[(0, 1)].feats
    assert torch.equal(plain, spec_augment(raw, SpecAugmentConfig(), item_rng(5, 1, utts[0].id, "specaug")))
    eq = UtteranceDataset(utts, _cfg(spec_augment=SpecAugmentConfig(eq_db=6.0)), tok, train=True, seed=5)
    want = spec_augment(random_eq(raw, 6.0, item_rng(5, 1, utts[0].id, "eq")), SpecAugmentConfig(),
                        item_rng(5, 1, utts[0].id, "specaug"))
    assert torch.equal(eq[(0, 1)].feats, want)


def test_dataset_augmentation_depends_on_epoch_only_in_training(tiny_manifest):
    _, utts = tiny_manifest(2)
    tok = _char_tok(utts)
    cfg = _cfg(spec_augment=SpecAugmentConfig(max_time_frac=0.2))
    train = UtteranceDataset(utts, cfg, tok, train=True, seed=5)
    again = pickle.loads(pickle.dumps(train))  # what a worker gets
    assert torch.equal(train[(0, 1)].feats, again[(0, 1)].feats)
    assert not torch.equal(train[(0, 1)].feats, train[(0, 2)].feats)
    clean = UtteranceDataset(utts, cfg, tok, train=False, seed=5)
    assert torch.equal(clean[(0, 1)].feats, clean[(0, 2)].feats)


def test_speed_perturbation_changes_length_by_the_factor(tiny_manifest):
    x = synth(1.0)
    for factor in (0.9, 1.1, 0.5):
        assert abs(len(speed_perturb(x, factor, 16000)) - 16000 / factor) <= 1
    assert choose_speed((), 0, 0, "a") == 1.0
    picks = {choose_speed((0.9, 1.0, 1.1), 0, e, "a") for e in range(30)}
    assert picks == {0.9, 1.0, 1.1}
    assert choose_speed((0.9, 1.0, 1.1), 0, 7, "a") == choose_speed((0.9, 1.0, 1.1), 0, 7, "a")
    _, utts = tiny_manifest(1)
    tok = _char_tok(utts)
    slow = UtteranceDataset(utts, _cfg(speed_perturb=(0.5,)), tok, train=True)[0].feats
    normal = UtteranceDataset(utts, _cfg(speed_perturb=(0.5,)), tok, train=False)[0].feats
    assert abs(slow.shape[0] - 2 * normal.shape[0]) <= 2


def test_feature_cache_is_written_used_and_keyed_by_config(tmp_path, tiny_manifest):
    _, utts = tiny_manifest(1)
    tok = _char_tok(utts)
    cache = tmp_path / "cache"
    ds = UtteranceDataset(utts, _cfg(feature_cache=str(cache)), tok, train=False)
    first = ds[0].feats
    [entry] = list(cache.rglob("*.npy"))
    assert not list(cache.rglob("*.tmp"))
    np.save(entry, np.zeros_like(first.numpy()))  # a marker: served from the cache?
    assert (ds[0].feats == 0).all()
    other = _cfg(feature_cache=str(cache), features=FeatureConfig(num_mel_bins=40))
    assert UtteranceDataset(utts, other, tok, train=False)[0].feats.shape[1] == 40
    assert len(list(cache.rglob("*.npy"))) == 2
    entry.write_bytes(b"damaged")
    assert torch.equal(ds[0].feats, first)  # recomputed


def test_workers_give_the_same_batches_as_the_main_process(tiny_manifest):
    manifest, utts = tiny_manifest(6)
    tok = _char_tok(utts)
    cfg = _cfg(speed_perturb=(0.9, 1.0, 1.1), spec_augment=SpecAugmentConfig())
    out = []
    for workers in (0, 1):
        loader, sampler = make_dataloader(dataclasses.replace(cfg, num_workers=workers), manifest, tok,
                                          train=True, seed=3)
        sampler.set_epoch(1)
        out.append([(b.ids, b.feats) for b in loader])
    assert [ids for ids, _ in out[0]] == [ids for ids, _ in out[1]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(out[0], out[1]))


def test_encoder_frames_formula():
    assert [Conv2dSubsampling4.output_length(f) for f in (0, 6, 7, 10, 11, 100)] == [0, 0, 1, 1, 2, 24]


def test_prepare_lang_writes_a_consistent_lang_dir(tmp_path, tiny_manifest, capsys):
    manifest, utts = tiny_manifest(6)
    cfg = _cfg(tokenizer=TokenizerConfig(kind="bpe", vocab_size=30), train_manifest=str(manifest),
               lang_dir=str(tmp_path / "lang"))
    info = prepare_lang(cfg)
    lang = tmp_path / "lang"
    tok = load_tokenizer(lang)
    assert tok.vocab_size == 30 == info["vocab_size"] and (lang / "tokens.txt").is_file()
    mean, istd = load_cmvn(lang / "cmvn.json")
    feats = torch.cat([Fbank(FeatureConfig()).compute(load_audio(u.audio_path)) for u in utts]).double()
    np.testing.assert_allclose(mean.numpy(), feats.mean(0).numpy(), rtol=1e-5, atol=1e-5)
    assert json.loads((lang / "cmvn.json").read_text())["frames"] == feats.shape[0]
    assert read_lang_info(lang)["features"]["num_mel_bins"] == 80
    check_lang(lang, cfg)
    with pytest.raises(DataError, match="data.features.dither"):
        check_lang(lang, dataclasses.replace(cfg, features=FeatureConfig(dither=1.0)))
    with pytest.raises(DataError, match="data.tokenizer.kind"):
        check_lang(lang, dataclasses.replace(cfg, tokenizer=TokenizerConfig(kind="char")))
    # the CLI form writes the same kind of directory
    assert main(["prepare", "--train-manifest", str(manifest), "--lang-dir", str(tmp_path / "lang2"),
                 "--tokenizer", "char"]) == 0
    assert load_tokenizer(tmp_path / "lang2").symbols == CharTokenizer.train([u.text for u in utts]).symbols
    assert "wrote" in capsys.readouterr().out
    assert main(["prepare", "--train-manifest", str(tmp_path / "none.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_prepare_cli_reads_a_config_with_overrides(tmp_path, tiny_manifest):
    manifest, _ = tiny_manifest(8)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"data:\n  train_manifest: {manifest}\n  lang_dir: {tmp_path / 'lang'}\n"
                        "  tokenizer: {kind: unigram, vocab_size: 20}\n")
    assert main(["prepare", "--config", str(cfg_file), "data.tokenizer.vocab_size=22"]) == 0
    info = read_lang_info(tmp_path / "lang")
    assert info["tokenizer"] == {"kind": "unigram", "vocab_size": 22}
    assert load_tokenizer(tmp_path / "lang").vocab_size == 22
    assert main(["prepare", "--config", str(cfg_file), "data.tokenizer.bogus=1"]) == 1
