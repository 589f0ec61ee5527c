"""Quantizing a model: where the high-precision rows are (layouts), activation and weight fake quantization
(fake_quant), GPTQ of one matrix (gptq), RTN and streamed GPTQ of every linear (weights), LQER / L2QER
(lqer), embedding tables (embeddings).
"""
