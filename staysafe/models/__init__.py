"""Models: loading (hub ids, local directories, the embedded GGUF), the shipped aligned reference and its build,
model names."""
