"""Measuring a model: corpora and calibration samplers, perplexity, and zero-shot accuracy through lm-eval.
Knows no profile; imports the core and the store."""
