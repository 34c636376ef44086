"""Token-reduction methods as plug-ins. Importing this package registers the built-in kinds (``tread``).

A folder of its own, beside backbones/: a method is neither a backbone nor diffusion code, and the
trainer, FLOP counter, throughput step, sampler and guidance code reach a method only through
:class:`Method` (methods/registry.py), so adding one is one file here plus its suite YAML.
"""
from .registry import Method, build_method, build_network, list_methods, register_method

from . import tread  # noqa: F401  (registers "tread")

__all__ = ["Method", "build_method", "build_network", "list_methods", "register_method"]
