"""Built-in rewrite passes (`sparsec.passes`), one module each, registered by name through the
`sparsec.passes` entry-point group (see pyproject.toml), the same way third-party passes register."""
