"""fastvit benchmark suites (``pytest benchmarks``) and the report (``python -m benchmarks.report``).

See benchmarks/NOTES.md for the method and the FLOP / byte floors, benchmarks/results/README.md
for what the results folder holds.
"""
