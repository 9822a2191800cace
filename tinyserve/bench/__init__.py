"""tinyserve's load generator (`tinyserve bench`): closed and open loop, measurement windows until
stable, percentiles, errors by code, terminal table, JSON and PNG plots.  See bench/README.md.

Library use (the open loop is what other benchmarks import):

    from tinyserve.bench.loadgen import TinyserveTarget, run_open_loop, run_closed_loop, run_sweep
    from tinyserve.bench.stats import StopRule
"""
