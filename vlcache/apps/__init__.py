"""The apps built on the library: the `vlcache` command line, the captioner, the Gradio demo, the benchmarks and the
embedded model's evaluation. They import the library and never the other way round (import contracts in
pyproject.toml, checked by `lint-imports`); no private (underscored) library name is used here."""
