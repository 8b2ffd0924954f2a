"""`streamkd pretrained`: a float16 teacher and its language directory."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from streamkd.checkpoint import build_model, inference_checkpoint, load_checkpoint, load_model, save_atomic
from streamkd.config import load_config
from streamkd.features import load_cmvn
from streamkd.lang import check_lang
from streamkd.tokenizer import load_tokenizer

from conftest import CONFIGS


def test_pretrained_is_float16_decodes_like_the_original_and_carries_its_lang(tiny_lang, tmp_path):
    tokenizer, cmvn = tiny_lang
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.frontend_channels=8"])
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer, cmvn).eval()
    src = tmp_path / "final.pt"
    save_atomic(inference_checkpoint(cfg, model.state_dict(), tokenizer.state_dict(), cmvn), src)

    out = tmp_path / "pre"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "streamkd", "pretrained", "--checkpoint", str(src), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]

    stored = load_checkpoint(out / "teacher.pt")["model"]
    assert all(v.dtype == torch.float16 for k, v in stored.items()
               if torch.is_floating_point(v) and not k.startswith("cmvn_"))
    assert stored["cmvn_mean"].dtype == torch.float32  # the input normalisation is kept exact
    assert (out / "teacher.pt").stat().st_size < 0.6 * src.stat().st_size

    small = load_model(out / "teacher.pt")
    assert all(p.dtype == torch.float32 for p in small.parameters())
    feats = torch.randn(2, 120, cfg.data.features.num_mel_bins)
    lens = torch.tensor([120, 90])
    with torch.no_grad():
        ref = model.ctc_log_probs(model(feats, lens).out)
        got = small.ctc_log_probs(small(feats, lens).out)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95

    lang = out / "lang"
    check_lang(lang, cfg.data)  # raises when features or tokenizer differ
    assert load_tokenizer(lang).state_dict() == tokenizer.state_dict()
    mean, istd = load_cmvn(lang / "cmvn.json")
    torch.testing.assert_close(mean, torch.tensor(cmvn["mean"], dtype=torch.float32))
    torch.testing.assert_close(istd, torch.tensor(cmvn["istd"], dtype=torch.float32))
