"""Word n-gram language models for CTC decoding: building with KenLM
(``build``), shallow fusion into prefix beam search (``fusion``), weight
tuning on dev (``tune``), the measurement report (``report``), an HLG
graph of the LM (``graph``) and offline decoding over it (``graph_search``)."""
from streamkd.lm.build import build_lm, gather_text
from streamkd.lm.fusion import LMFusion, WordLM, load_lm

__all__ = ["build_lm", "gather_text", "LMFusion", "WordLM", "load_lm"]
