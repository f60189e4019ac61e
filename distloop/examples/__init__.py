"""Built-in examples: the default `distloop` job trains ``digits``."""
