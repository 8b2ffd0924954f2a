"""The distillation objective with tiny random teacher and student models."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from streamkd.config import Config, ConfigError, DataConfig, EncoderConfig, FeatureConfig, KDConfig, SpecAugmentConfig
from streamkd.errors import DataError
from streamkd.kd import build_objective, precompute_teacher, strip_to_student
from streamkd.kd import make_plan
from streamkd.kd.teacher import LiveTeacher
from streamkd.kd.losses import ctc_loss
from streamkd.model import CTCModel
from streamkd.tokenizer import CharTokenizer
from streamkd.types import Batch, ChunkConfig

C = 20  # feature bins, small to keep the front end cheap
SYMBOLS = ["<blk>", "a", "b", "c", "d", "e", "f", "g"]
DATA = DataConfig(features=FeatureConfig(num_mel_bins=C), spec_augment=SpecAugmentConfig(enabled=False))
TEACHER_ENC = EncoderConfig(d_model=32, num_layers=4, num_heads=4, ff_mult=2, conv_kernel=5, dropout=0.0,
                            max_rel_pos=8)
STUDENT_ENC = EncoderConfig(d_model=24, num_layers=2, num_heads=4, ff_mult=2, conv_kernel=5, dropout=0.0,
                            max_rel_pos=8, causal=True, chunk=ChunkConfig(2, 1))


def _model(enc: EncoderConfig, symbols=SYMBOLS, data=DATA, seed=0) -> CTCModel:
    torch.manual_seed(seed)
    return CTCModel(enc, len(symbols), torch.randn(C) * 0.1, torch.ones(C) + 0.1 * torch.rand(C), input_dim=C,
                    tokenizer=CharTokenizer(symbols), config=Config(data=data, model=enc))


def _cfg(**kd) -> Config:
    return Config(data=DATA, model=STUDENT_ENC, kd=KDConfig(**kd))


def _batch(seed=1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    feat_lens = torch.tensor([40, 31])  # -> 9 and 7 encoder frames
    feats = torch.randn(2, 40, C, generator=g)
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, -1, -1]])
    return Batch(ids=["spk/utt-1", "utt 2"], feats=feats, feat_lens=feat_lens, tokens=tokens,
                 token_lens=torch.tensor([4, 2]))


@pytest.fixture(scope="module")
def teacher() -> CTCModel:
    return _model(TEACHER_ENC, seed=123).eval()


METHODS = {
    "none": (dict(method="none"), {"ctc"}),
    "token": (dict(method="token", temperature=2.0), {"ctc", "tok"}),
    "token_shift": (dict(method="token", shift_frames=2), {"ctc", "tok"}),
    "layer": (dict(method="layer"), {"ctc", "layer"}),
    "aux": (dict(method="aux"), {"ctc", "feat", "attn", "apc"}),
    "aux+token": (dict(method="aux+token"), {"ctc", "feat", "attn", "apc", "tok"}),
    "aux_alpha0": (dict(method="aux", alpha=0.0), {"ctc", "attn", "apc"}),
    "aux_beta0": (dict(method="aux", beta=0.0), {"ctc", "feat", "apc"}),
    "aux_gamma0": (dict(method="aux", gamma=0.0), {"ctc", "feat", "attn"}),
    "aux_apc_only": (dict(method="aux", alpha=0.0, beta=0.0), {"ctc", "apc"}),
    "aux_hole": (dict(method="aux", apc_input="aux_hole", apc_horizon=3), {"ctc", "feat", "attn", "apc"}),
    "aux_hole_apc_only": (dict(method="aux", apc_input="aux_hole", alpha=0.0, beta=0.0), {"ctc", "apc"}),
    "aux_lambda0": (dict(method="aux", lambda_=0.0), {"ctc"}),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_computes_and_steps(name, teacher):
    kd, keys = METHODS[name]
    student = _model(STUDENT_ENC)
    objective = build_objective(KDConfig(**kd), DATA, student, "cpu", teacher=teacher)
    objective.train()
    losses = objective(_batch())
    assert set(losses) == keys | {"loss"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    before = {k: v.clone() for k, v in objective.student.state_dict().items()}
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-2)
    losses["loss"].backward()
    opt.step()
    changed = [k for k, v in objective.student.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.layers.0.") for k in changed)
    # modules only a switched-off loss needs are not built
    assert (len(objective.branches) > 0) == bool({"feat", "attn"} & keys or "hole" in name and "apc" in keys)
    assert (len(objective.predictors) > 0) == ("apc" in keys)


def test_total_is_the_weighted_sum(teacher):
    kd = dict(method="aux+token", lambda_=0.5, alpha=2.0, beta=3.0, gamma=0.25, mu=1.5)
    objective = build_objective(KDConfig(**kd), DATA, _model(STUDENT_ENC), teacher=teacher).eval()
    losses = objective(_batch())
    expected = losses["ctc"] + 1.5 * losses["tok"] + 0.5 * (
        2.0 * losses["feat"] + 3.0 * losses["attn"] + 0.25 * losses["apc"])
    assert torch.allclose(losses["loss"], expected, rtol=1e-6)


def test_teacher_bf16_gives_fp32_losses_close_to_the_fp32_teacher(teacher):
    kd = dict(method="aux+token")
    student = _model(STUDENT_ENC)
    torch.manual_seed(0)  # the same branches and predictors in both objectives
    exact = build_objective(KDConfig(**kd), DATA, student, teacher=teacher).eval()(_batch())
    torch.manual_seed(0)
    objective = build_objective(KDConfig(teacher_bf16=True, **kd), DATA, student, teacher=teacher).eval()
    outputs = LiveTeacher(teacher, bf16=True).outputs(_batch(), *_student_frames(student), objective.plan)
    assert all(h.dtype == torch.float32 for h in outputs.hidden.values())
    assert all(x.dtype == torch.float32 for q in outputs.qkv.values() for x in q)
    approx = objective(_batch())
    for name in ("tok", "feat", "attn", "apc"):
        # bf16 keeps 8 bits of mantissa: the teacher's targets move by ~1%.
        assert approx[name].item() == pytest.approx(exact[name].item(), rel=0.02, abs=1e-3), name
        assert approx[name].item() != exact[name].item(), name  # the teacher did run in bf16
    approx["loss"].backward()
    assert student.encoder.layers[0].ff1.net[1].weight.grad is not None


def _student_frames(student):
    enc = student(_batch().feats, _batch().feat_lens)
    return enc.out_lens, enc.out.size(1)


def test_no_gradient_reaches_the_teacher(teacher):
    teacher = copy.deepcopy(teacher)
    snapshot = {k: v.clone() for k, v in teacher.state_dict().items()}
    objective = build_objective(KDConfig(method="aux+token"), DATA, _model(STUDENT_ENC), teacher=teacher)
    objective.train()
    assert not objective.teacher.training  # train() keeps the teacher frozen
    t_ids = {id(p) for p in teacher.parameters()}
    assert not t_ids & {id(p) for p in objective.parameters()}
    assert not any(k.startswith("_teacher") or "teacher" in k for k in objective.state_dict())
    opt = torch.optim.SGD(objective.parameters(), lr=0.1)
    objective(_batch())["loss"].backward()
    opt.step()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, snapshot[k]) for k, v in teacher.state_dict().items())


def test_feature_loss_gradient_reaches_streaming_layers_through_branch(teacher):
    # only pair (2, 4): the gradient must cross the branch, then layer 2, to reach layer 1
    cfg = _cfg(method="aux", beta=0.0, gamma=0.0, layer_map=((2, 4),))
    objective = build_objective(cfg.kd, cfg.data, _model(STUDENT_ENC), teacher=teacher).train()
    objective(_batch())["feat"].backward()
    layer1 = list(objective.student.encoder.layers[0].parameters())
    assert all(p.grad is not None for p in layer1)
    assert sum(float(p.grad.abs().sum()) for p in layer1) > 0
    assert objective.student.ctc_head.weight.grad is None  # feat alone does not touch the head
    assert all(p.grad is not None for p in objective.branches[0].parameters())


def test_branch_reads_and_feeds_nothing_back(teacher):
    student = _model(STUDENT_ENC)
    plain = copy.deepcopy(student).eval()
    objective = build_objective(KDConfig(method="aux", apc_input="aux_hole"), DATA, student, teacher=teacher).eval()
    seen = []
    student.register_forward_hook(lambda mod, inp, out: seen.append(out))
    batch = _batch()
    losses = objective(batch)
    ref = plain(batch.feats, batch.feat_lens, return_hidden=True)
    assert torch.equal(seen[0].out, ref.out)
    assert all(torch.equal(a, b) for a, b in zip(seen[0].hidden, ref.hidden))
    ref_ctc = ctc_loss(plain.ctc_log_probs(ref.out), ref.out_lens, batch.tokens, batch.token_lens)
    assert torch.equal(losses["ctc"], ref_ctc)


def test_stripped_student_is_a_plain_ctc_model(teacher):
    objective = build_objective(KDConfig(method="aux+token"), DATA, _model(STUDENT_ENC), teacher=teacher)
    plain = CTCModel(STUDENT_ENC, len(SYMBOLS), torch.zeros(C), torch.ones(C), input_dim=C)
    stripped = strip_to_student(objective.state_dict())
    assert list(stripped) == list(plain.state_dict())
    assert stripped.keys() == objective.student_state_dict().keys()
    n_plain = sum(p.numel() for p in plain.parameters())
    assert sum(v.numel() for k, v in stripped.items() if k in dict(plain.named_parameters())) == n_plain
    assert sum(p.numel() for p in objective.parameters()) > n_plain  # the training-only modules
    plain.load_state_dict(stripped, strict=True)


def test_default_layer_map_follows_method_md():
    kd = KDConfig(method="aux")
    assert make_plan(kd, 12, 12).pairs == ((4, 4), (8, 8), (12, 12))
    assert make_plan(kd, 6, 12).pairs == ((2, 4), (4, 8), (6, 12))
    assert make_plan(kd, 2, 4).pairs == ((1, 2), (2, 4))


def _bad(teacher_model, **kd):
    return dict(cfg=_cfg(**kd), teacher=teacher_model, student=_model(STUDENT_ENC))


def _validation_cases(teacher):
    streaming_teacher = _model(dataclasses.replace(TEACHER_ENC, chunk=ChunkConfig(4)))
    other_feats = _model(TEACHER_ENC, data=dataclasses.replace(
        DATA, features=dataclasses.replace(DATA.features, frame_shift_ms=12.5)))
    other_syms = _model(TEACHER_ENC, symbols=["<blk>", "a", "b", "c", "d", "e", "f", "z"])
    return {
        "no_teacher": (dict(_bad(None, method="aux")), "kd.teacher"),
        "missing_ckpt": (dict(_bad(None, method="token", teacher="/nonexistent/teacher.pt")), "kd.teacher"),
        "streaming_teacher": (dict(_bad(streaming_teacher, method="aux")), "full-context"),
        "features": (dict(_bad(other_feats, method="layer")), "data.features.*frame_shift_ms"),
        "vocab_size": (dict(_bad(teacher, method="token"), student=_model(STUDENT_ENC, symbols=SYMBOLS + ["h"])),
                       "kd.method.*9.*8"),
        "symbols": (dict(_bad(other_syms, method="aux+token")), "symbol 7"),
        "student_layer": (dict(_bad(teacher, method="aux", layer_map=((3, 4),))), r"kd.layer_map\[0\].*student"),
        "teacher_layer": (dict(_bad(teacher, method="layer", layer_map=((1, 1), (2, 5)))), r"kd.layer_map\[1\].*teacher"),
        "relation_heads": (dict(_bad(teacher, method="aux", relation_heads=5)), "kd.relation_heads"),
    }


@pytest.mark.parametrize("case", ["no_teacher", "missing_ckpt", "streaming_teacher", "features", "vocab_size",
                                  "symbols", "student_layer", "teacher_layer", "relation_heads"])
def test_validation_errors_name_the_key(case, teacher):
    args, pattern = _validation_cases(teacher)[case]
    with pytest.raises(ConfigError, match=pattern):
        build_objective(args["cfg"].kd, args["cfg"].data, args["student"], teacher=args["teacher"])


@pytest.mark.parametrize("kd, key", [(dict(alpha=-1.0), "kd.alpha"), (dict(lambda_=-0.5), "kd.lambda"),
                                     (dict(temperature=0.0), "kd.temperature"), (dict(apc_horizon=0), "kd.apc_horizon"),
                                     (dict(shift_frames=-1), "kd.shift_frames"), (dict(relation_heads=0), "kd.relation_heads")])
def test_kd_values_fail_when_the_config_is_made(kd, key):
    """Before any model is built: in the dataclass, and through the loader
    with the command-line argument named."""
    from conftest import CONFIGS
    from streamkd.config import load_config

    with pytest.raises(ConfigError, match=key):
        KDConfig(**kd)
    name, value = next(iter(kd.items()))
    arg = f"kd.{name.rstrip('_')}={value}"
    with pytest.raises(ConfigError, match=key) as err:
        load_config(CONFIGS / "tiny_student.yaml", [arg])
    assert f"command-line argument '{arg}'" in str(err.value)


@pytest.mark.parametrize("data,key", [
    (dataclasses.replace(DATA, spec_augment=SpecAugmentConfig(enabled=True)), "data.spec_augment"),
    (dataclasses.replace(DATA, speed_perturb=(0.9, 1.0, 1.1)), "data.speed_perturb"),
])
def test_precomputed_refuses_augmentation(data, key, teacher, tmp_path):
    cfg = dataclasses.replace(_cfg(method="aux", precomputed_dir=str(tmp_path)), data=data)
    with pytest.raises(ConfigError, match=key):
        precompute_teacher(cfg.kd, cfg.data, teacher, student_layers=STUDENT_ENC.num_layers, batches=[_batch()])
    with pytest.raises(ConfigError, match=key):
        build_objective(cfg.kd, cfg.data, _model(STUDENT_ENC), teacher=teacher)


def test_precomputed_teacher_gives_the_live_loss(teacher, tmp_path):
    kd = dict(method="aux+token", apc_input="aux_hole", shift_frames=1)
    batches = [_batch(1), Batch(**{**vars(_batch(2)), "ids": ["c", "d"]})]
    live = build_objective(KDConfig(**kd), DATA, _model(STUDENT_ENC), teacher=teacher).eval()
    cfg = _cfg(**kd, precomputed_dir=str(tmp_path / "teacher"))
    assert precompute_teacher(cfg.kd, cfg.data, teacher, student_layers=STUDENT_ENC.num_layers, batches=batches) == 4
    # no teacher model: everything comes from the directory
    cached = build_objective(cfg.kd, cfg.data, _model(STUDENT_ENC)).eval()
    assert cached.teacher is None
    cached.load_state_dict(live.state_dict())
    # utterances regrouped into new batches: padding differs from precompute time
    mixed = Batch(ids=["c", "spk/utt-1"], feats=torch.stack([batches[1].feats[0], batches[0].feats[0]]),
                  feat_lens=torch.tensor([40, 40]), tokens=batches[0].tokens, token_lens=batches[0].token_lens)
    for batch in batches + [mixed]:
        a, b = live(batch), cached(batch)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    with pytest.raises(DataError, match="unknown-utt"):
        cached(Batch(**{**vars(batches[0]), "ids": ["unknown-utt", "c"]}))
    # a config needing what was not stored is refused up front
    with pytest.raises(ConfigError, match="kd.precomputed_dir"):
        build_objective(KDConfig(method="layer", layer_map=((1, 1),), precomputed_dir=str(tmp_path / "teacher")),
                        DATA, _model(STUDENT_ENC))


def test_precompute_from_a_manifest(tiny_manifest, tmp_path):
    from streamkd.dataset import make_dataloader

    manifest, utts = tiny_manifest(3)
    symbols = CharTokenizer.train([u.text for u in utts]).symbols
    teacher = _model(TEACHER_ENC, symbols=symbols, seed=7).eval()
    cfg = _cfg(method="aux+token", precomputed_dir=str(tmp_path / "t"))
    assert precompute_teacher(cfg.kd, cfg.data, teacher, str(manifest), student_layers=STUDENT_ENC.num_layers) == 3
    student = _model(STUDENT_ENC, symbols=symbols)
    live = build_objective(dataclasses.replace(cfg.kd, precomputed_dir=None), cfg.data,
                           student, teacher=teacher).eval()
    cached = build_objective(cfg.kd, cfg.data, copy.deepcopy(student))
    cached.load_state_dict(live.state_dict())
    cached.eval()
    loader, _ = make_dataloader(cfg.data, manifest, teacher.tokenizer, train=False, seed=0)
    for batch in loader:
        a, b = live(batch), cached(batch)
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
