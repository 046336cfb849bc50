"""The transformers modeling code an HF export of a heterogeneous model ships beside its weights.

``configuration_decilm.py`` and ``modeling_decilm.py`` are package data, not part of minitron_jax's own import
graph: :mod:`minitron_jax.convert.deci_hf` copies them into every DeciLM directory it writes (named by
``auto_map``), where ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` imports them. They need
only torch and transformers. Importing this package imports neither.
"""
