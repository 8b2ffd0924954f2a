"""The distillation plan: which losses of ``kd.method`` run, on which layers.

One code path for the paper's method and its baselines (docs/method.md):

    none       L = L_ctc
    token      L = L_ctc + mu L_tok
    layer      L = L_ctc + lambda sum_M alpha L_feat(proj(s_i), h_j)          (term "layer")
    aux        L = L_ctc + lambda sum_M (alpha L_feat(z_i, h_j) + beta L_attn + gamma L_apc)
    aux+token  both

s_i: student layer i's streaming output, h_j: teacher layer j's output,
z_i: the auxiliary branch's output on s_i. A weight of 0 switches its loss
off and skips its compute (and the modules only it needs are not built).

Default layer map (``kd.layer_map: []``): k = min(3, L_s, L_t) pairs evenly
spaced and ending at both last layers, (round(m L_s / k), round(m L_t / k))
for m = 1..k: {(4,4), (8,8), (12,12)} for two 12-layer encoders and
{(2,4), (4,8), (6,12)} for a 6-layer student of a 12-layer teacher, the
examples of method.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from streamkd.config import KDConfig
from streamkd.errors import ConfigError

__all__ = ["KDPlan", "make_plan"]


@dataclass(frozen=True)
class KDPlan:
    """Which losses run, on which layer pairs (1-based (student, teacher))."""

    pairs: tuple[tuple[int, int], ...]
    use_tok: bool
    use_layer: bool
    use_feat: bool
    use_attn: bool
    use_apc: bool
    apc_input: str

    @property
    def uses_layers(self) -> bool:
        return self.use_layer or self.use_feat or self.use_attn or self.use_apc

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        return tuple(sorted({j for _, j in self.pairs})) if self.uses_layers else ()

    @property
    def needs_branch(self) -> bool:
        return self.use_feat or self.use_attn or (self.use_apc and self.apc_input == "aux_hole")


def _default_layer_map(student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
    k = min(3, student_layers, teacher_layers)
    # round half up of m * L / k in integers
    return tuple(
        ((2 * m * student_layers + k) // (2 * k), (2 * m * teacher_layers + k) // (2 * k))
        for m in range(1, k + 1)
    )


def make_plan(kd: KDConfig, student_layers: int, teacher_layers: int) -> KDPlan:
    """Resolve ``kd`` against the encoders' depths; errors name the config key."""
    method = kd.method
    layer_on = method in ("layer", "aux", "aux+token") and kd.lambda_ > 0
    aux = layer_on and method != "layer"
    pairs = tuple(tuple(p) for p in kd.layer_map) or _default_layer_map(student_layers, teacher_layers)
    for m, (i, j) in enumerate(pairs):
        if not 1 <= i <= student_layers:
            raise ConfigError(
                f"kd.layer_map[{m}]: student layer {i} is out of range 1..{student_layers} "
                f"(layers are 1-based; the student has model.num_layers={student_layers})"
            )
        if not 1 <= j <= teacher_layers:
            raise ConfigError(
                f"kd.layer_map[{m}]: teacher layer {j} is out of range 1..{teacher_layers} "
                f"(layers are 1-based; the teacher has {teacher_layers} layers)"
            )
    return KDPlan(
        pairs=pairs if layer_on else (),
        use_tok=method in ("token", "aux+token") and kd.mu > 0,
        use_layer=method == "layer" and layer_on and kd.alpha > 0,
        use_feat=aux and kd.alpha > 0,
        use_attn=aux and kd.beta > 0,
        use_apc=aux and kd.gamma > 0,
        apc_input=kd.apc_input,
    )
