"""Quantizer arithmetic on arrays: integer quantizers with their codes and clip search (integer), MXINT block
formats (mxint), int4 packing (packing), bit-width checks and the 16-bit 'off' convention (bits).
"""
