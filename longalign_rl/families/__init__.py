"""Model families, registered like rewards, algorithms and models: "sd" (SD 1.x / 2.x),
"sdxl", "sd3" (SD3 / SD3.5) and "flux" (FLUX.1) built in, third parties through the entry-point group `longalign_rl.families`
(name -> a `Family` subclass). A diffusers folder's family comes from its
model_index.json `_class_name`; `model.family` can name one. Pure torch: no ray, no deepspeed.
"""

from __future__ import annotations

from longalign_rl.families.base import Components, Family
from longalign_rl.families.sd import SD
from longalign_rl.families.flux import Flux
from longalign_rl.families.sd3 import SD3
from longalign_rl.families.sdxl import SDXL
from longalign_rl.registry import Registry

FAMILIES = Registry("model family", "longalign_rl.families",
                    builtins=lambda: {"sd": SD, "sdxl": SDXL, "sd3": SD3, "flux": Flux})


def find_family(name: str) -> type[Family]:
    family = FAMILIES.find(name)
    if not (isinstance(family, type) and issubclass(family, Family)):
        raise TypeError(f"model family {name!r} is {family!r}, not a subclass of longalign_rl.families.Family")
    return family


def default_family() -> type[Family]:
    """The family of a model that names none (a folder without model_index.json, a loader's
    parts without one): SD 1.x, what every model was before families existed."""
    return SD


def family_for_pipeline(class_name: str, where: str) -> type[Family]:
    """The family whose diffusers pipeline class is `class_name` (model_index.json's
    `_class_name`); ValueError naming the class and the supported ones otherwise."""
    known = {}
    for name in FAMILIES.names():
        family = find_family(name)
        for pipeline in family.pipeline_classes:
            known[pipeline] = family
    if class_name not in known:
        raise ValueError(f"{where}: pipeline class {class_name!r} is not a supported model family; supported: "
                         + ", ".join(f"{p} ({f.name})" for p, f in sorted(known.items())))
    return known[class_name]


__all__ = ["Components", "FAMILIES", "Family", "Flux", "SD", "SD3", "SDXL", "default_family", "family_for_pipeline", "find_family"]
