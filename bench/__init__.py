"""`dscompile bench`: the harness (run.py: one bench run and its options; systems.py, hf_systems.py, floors.py,
timing.py, memory.py, cache.py, report.py).

This package imports nothing: memory.py measures each system in a child process that imports the
system's loader from here (hf_loaders.py too), and the child must hold only what its loader imports.
"""
