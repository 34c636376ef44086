"""The diffusion formulations, each whole (as SiT's transport/): an objective wraps the network, draws a
step's noise, computes the loss, and samples. Importing this package registers ``edm`` (the default) and
``flow``; adding one is one file with ``@register_objective("name")`` plus ``suites/objective/<name>.yaml``."""
from .objective import Objective, build_objective, list_objectives, register_objective
from .sampler import SamplerConfig

from . import edm, flow  # noqa: F401  (register "edm" and "flow")

__all__ = ["Objective", "SamplerConfig", "build_objective", "list_objectives", "register_objective"]
