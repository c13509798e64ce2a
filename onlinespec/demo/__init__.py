"""The bundled demo: offline corpora, the model-family build, and held-out prompts."""
