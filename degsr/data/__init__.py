"""Training data: WebDataset shards of whole images (see :mod:`degsr.data.shards`)."""
