"""Where weights and records live: model specs and loading, sliced save/load, streaming from safetensors, the
memory plan, atomic JSON, caches, and the ownership of every output path. Imports only the core."""
