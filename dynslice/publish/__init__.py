"""Publishing results: tables, figures, generated notes, notebook set-up and the reproduction check. Reads the run
records that experiments write; never runs a model."""
