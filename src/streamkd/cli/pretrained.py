"""``streamkd pretrained``: a trained teacher in the form a repository
ships (float16 weights) and its language directory."""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["configure"]


def configure(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrained",
        help="write a trained model as a small float16 checkpoint plus its language directory",
        description="Write OUT/teacher.pt (inference checkpoint, float16 weights) and OUT/lang/ "
        "(tokenizer, tokens.txt, CMVN of the model) so that students can be distilled from it "
        "without its training data: point data.lang_dir at OUT/lang and kd.teacher at OUT/teacher.pt.",
    )
    p.add_argument("--checkpoint", required=True, help="trained model (final.pt or any checkpoint)")
    p.add_argument("--out", required=True, help="output folder, e.g. pretrained/")
    p.add_argument("--name", default="teacher.pt", help="file name of the checkpoint in OUT")
    p.set_defaults(func=_pretrained)


def _pretrained(args) -> int:
    from streamkd.checkpoint import load_model, save_pretrained
    from streamkd.lang import write_lang_of_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / args.name
    save_pretrained(args.checkpoint, target)
    model = load_model(target)
    write_lang_of_model(model, out / "lang", source=str(target))
    size_mb = target.stat().st_size / 2**20
    print(f"wrote {target} ({size_mb:.2f} MiB, {sum(p.numel() for p in model.parameters()):,} parameters) "
          f"and {out / 'lang'}/")
    return 0
