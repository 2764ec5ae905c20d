"""Data: tokenizer, sources, built-in corpus, mixture sampling, PrefixLM packing, Grain pipeline.

Flow: `python -m hrmtext.prepare` turns JSONL/Parquet rows (or the built-in reasoning_gym corpus)
into the reference sampled layout, as tasks (`stages`) that an `engine` runs on local processes or
Apache Beam; `pipeline.make_train_iterator` packs it into training batches.
"""
