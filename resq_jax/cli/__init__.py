"""Command-line programs: resq-quantize (quantize), resq-evaluate (evaluate), resq-benchmark (benchmark,
bench_hadamard), with their shared plumbing (common) and the printed table (table).
"""
