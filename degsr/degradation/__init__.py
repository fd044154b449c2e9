"""The degradation engine: Real-ESRGAN second-order synthesis, batched, drawn per sample."""
