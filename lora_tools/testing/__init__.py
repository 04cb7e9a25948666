"""Test-model builders: tiny or full-size SDXL-topology models and LoRAs with random weights.

Used by the demo, the tests, the benchmarks and the examples; never imported by a command's own
code path, except :mod:`.hooks` (fault-test pause points, inert unless a test sets their variables).
"""
