"""``degsr quickstart``: shards, a fitted tiny prior, stage 1, stage 2, sr and eval in minutes
on a CPU, with a report (:mod:`degsr.quickstart.run`)."""
