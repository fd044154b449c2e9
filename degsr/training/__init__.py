"""Running a stage: Trainer, logger, checkpoints and exports from the config (``degsr fit``)."""
