"""The built-in suite kinds; importing this package registers them (``train``, ``flops``, ``throughput``,
``guidance``).

Adding a suite kind is one file plus the suites that name it. The file defines the function that runs a
suite, ``run(cfg, suite) -> exit code``, and registers it with ``@register_suite_kind`` from
``tread_bench.engine.kinds``. The registration carries a dataclass of the suite keys only this kind reads, the
rules for their values and a check of the whole suite, so the engine types and checks the keys before
anything runs. A suite names the kind with ``kind: <name>``. Outside this repository, name the module on
the command line (``imports=[my_pkg.my_kind]``). Inside the function, ``prepare_runs`` (tread_bench.engine.spec)
returns the suite's runs, each validated on the meta device; ``build_run_network`` builds a run's network;
``write_table`` (tread_bench.engine.tables) writes the results. tread_bench/kinds/flops.py is the shortest
example.
"""
from . import flops, guidance, throughput, train  # noqa: F401  (each registers its kind)
