"""The pass infrastructure: `Pass`, the registry, `PassManager`, recipe options."""
