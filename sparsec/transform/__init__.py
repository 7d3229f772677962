"""The pass infrastructure: `Pass`, the registry, `PassManager` and its instruments (`PassInstrument`), recipe options."""
