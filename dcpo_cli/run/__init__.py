"""dcpo run: the whole loop in one process, settings in RUN_DIR/run.toml."""
