"""Training objectives as plug-ins. Importing this package registers ``edm`` (the default) and ``flow`` (SiT).

A folder of its own, beside backbones/ and methods/: the three plug-in kinds each have one registry
folder, so a new backbone, method or objective is one file in its folder (plus YAML). The EDM numerics
stay in diffusion/edm.py and diffusion/sampler.py; objectives/edm.py puts them behind the interface.
"""
from .registry import Objective, build_objective, list_objectives, register_objective

from . import edm, flow  # noqa: F401  (register "edm" and "flow")

__all__ = ["Objective", "build_objective", "list_objectives", "register_objective"]
