"""laggard: the shared core (event schema, settings, local stack, CLI) of the pipeline."""

__version__ = "0.1.0"
