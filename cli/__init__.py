"""The `reverse-sd` command line: `materialize` hands runs to the Dagster instance and follows them
(``runs``, ``planning``, ``staleness``), `predict` writes prompts for images.  Nothing here is a Dagster
definition: those live in ``assets``."""
