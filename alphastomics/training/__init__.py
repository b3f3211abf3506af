"""Training: the LightningModule, the Trainer builder, callbacks and checkpoint files."""
