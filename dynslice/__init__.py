"""dynslice: dynamic LLM slicing based on layer redundancy (Dumitru et al., Findings of EMNLP 2024).

SliceGPT's rotate-and-slice with one residual-stream width per decoder layer, the Layer Redundancy (LR)
score that chooses those widths, and the evaluation used in the paper.
"""

__version__ = "0.1.0"
