"""tread-bench's own packages, installed under one name: ``core`` (errors, atomic writes, the registry class),
``data``, ``methods`` (token-reduction plug-ins), ``training`` (the trainer and checkpoints), ``measure``,
``engine`` (the run engine) and the suite kinds. ``backbones``, ``routing`` and ``diffusion`` stay top level."""
