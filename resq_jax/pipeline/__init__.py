"""The pipeline: recipes as keyword-built configurations and their settings (recipes) and the quantize
orchestration that runs a recipe's stages (quantize).
"""
