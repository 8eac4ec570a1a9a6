"""The apps built on the library: the `vlcache` command line, the captioner, the Gradio demo, the benchmarks and the
embedded model's evaluation. They use the library's public names only; the library never imports them (import
contracts in pyproject.toml, checked by `lint-imports`)."""
