"""Integrations with other libraries (optional extra ``mhckit[hf]``).

- :mod:`mhckit.integrations.hf`: retrofit a Hugging Face decoder with hyper-connections.
- :mod:`mhckit.integrations.deepseek_v4`: load and export the weights of ``transformers``'
  DeepSeek-V4 hyper-connection modules.

Submodules import ``transformers`` lazily; ``import mhckit`` never needs it.
"""
