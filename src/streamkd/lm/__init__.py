"""Word n-gram language models for CTC decoding: building with KenLM
(``build``), shallow fusion into prefix beam search (``fusion``), weight
tuning on dev (``tune``) and the measurement report (``report``)."""
from streamkd.lm.build import build_lm, gather_text
from streamkd.lm.fusion import LMFusion, WordLM, load_lm

__all__ = ["build_lm", "gather_text", "LMFusion", "WordLM", "load_lm"]
