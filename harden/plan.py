"""`apply` as data: the plan of passes its options ask for, and the ablation's variants.

    simplify -> [clip-search] -> clip -> [clip-train] -> [saq | variability] -> quantize   (once)
    -> faq                                                                              (per chip)

`plan(options)` builds the chip-independent list; a third-party pass from the `harden.passes`
entry point goes where `--pass NAME[@before:P|@after:P]` puts it (default: after quantize, on
the int8 model). The ablation's variants are the same plan with passes removed
(`ablation_plans`), rerun from the manager's snapshots so nothing is computed twice.
"""

from __future__ import annotations

import re
from typing import Sequence

from . import plugins
from .clip_search import ClipSearchPass
from .data import Dataset
from .errors import InputError
from .options import Config, TrainingConfig
from .passes import Pass
from .passes.clip import ClipPass
from .passes.prepare import PreparePass
from .passes.quantize import QuantizePass

#: The torch passes (optional extra `train`) between clip and quantize.
TRAINING_PASSES = ("clip-train", "saq", "variability")
#: The passes that make up the clip step (removed together for the ablation's "int8").
CLIP_PASSES = ("clip-search", "clip")

_PLACE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(@(?P<where>before|after):(?P<anchor>[A-Za-z0-9_.-]+))?$")


def plan(cfg: Config, train: Dataset | None = None) -> list[Pass]:
    """The chip-independent passes `apply` runs for this configuration, in order."""
    passes: list[Pass] = [PreparePass()]
    if cfg.clip.enabled:
        if cfg.clip.search:
            passes.append(ClipSearchPass(cfg.clip.style))
        passes.append(ClipPass(cfg.clip.style, cfg.clip.percentile))  # None: the search's choice
    passes += training_passes(cfg.training, cfg.seed, train)
    passes.append(QuantizePass())
    for spec in cfg.passes:
        passes = place(passes, spec)
    return passes


def place(passes: list[Pass], spec: str) -> list[Pass]:
    """`NAME`, `NAME@before:PASS` or `NAME@after:PASS`: a `harden.passes` plugin in the plan."""
    m = _PLACE.match(spec.strip())
    if m is None:
        raise InputError(f"--pass {spec!r}: give NAME, NAME@before:PASS or NAME@after:PASS")
    name = m["name"]
    if name not in plugins.names(plugins.PASSES):
        raise InputError(f"--pass {name!r}: no such pass (installed: {', '.join(plugins.names(plugins.PASSES))})")
    obj = plugins.load(plugins.PASSES, name)
    p = obj() if isinstance(obj, type) else obj
    if not isinstance(p, Pass):
        raise InputError(f"--pass {name!r}: {type(p).__name__} does not subclass harden.passes.Pass (docs/plugins.md)")
    where, anchor = (m["where"], m["anchor"]) if m["where"] else ("after", "quantize")
    names = [q.name for q in passes]
    if anchor not in names:
        raise InputError(f"--pass {spec!r}: no pass {anchor!r} in the plan ({' -> '.join(names)})")
    i = names.index(anchor) + (1 if where == "after" else 0)
    return [*passes[:i], p, *passes[i:]]


def training_passes(t: TrainingConfig, seed: int, train: Dataset | None) -> list[Pass]:
    """The torch passes between clip and quantize (imported only when asked for: the core never
    needs torch): clip-train (ProAct), then saq / variability (one fine-tune, with noise when asked)."""
    passes: list[Pass] = []
    if t.clip_train:
        from .passes.proact import ProActPass
        from .train.proact import ProActConfig

        passes.append(ProActPass(ProActConfig(seed=seed), train))
    if t.finetune:
        from .passes.saq import SAQPass
        from .train.saq import SAQConfig

        noise = None
        if t.variability is not None:
            from .train.variability import lognormal_noise

            noise = lognormal_noise(*t.variability)
        cfg = SAQConfig(epochs=t.epochs, lr=t.lr, rho=t.rho, sam=t.saq, seed=seed)
        name = "saq" if t.saq else "variability"
        passes.append(SAQPass(cfg, train, noise, label="--" + name, name=name, variability=t.variability))
    return passes


def ablation_plans(passes: Sequence[Pass]) -> list[tuple[str, str | None, set[str]]]:
    """(variant name, the pass it adds, the passes removed from the full plan) per variant:
    int8 [-> +clip] [-> +training]; the last one is the full plan (nothing removed)."""
    names = [p.name for p in passes]
    clip = [n for n in names if n in CLIP_PASSES]
    trained = [n for n in names if n in TRAINING_PASSES]
    out: list[tuple[str, str | None, set[str]]] = [("int8", None, set(clip) | set(trained))]
    if clip:
        out.append(("int8+clip", "clip", set(trained)))
    if trained:
        name = "+".join(trained)
        out.append((f"{out[-1][0]}+{name}", name, set()))
    return out
