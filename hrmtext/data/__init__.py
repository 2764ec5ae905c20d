"""Data: tokenizer, sources, built-in corpus, mixture sampling, PrefixLM packing, Grain pipeline.

Flow: `python -m hrmtext.prepare` turns JSONL/Parquet rows (or the built-in reasoning_gym corpus)
into the reference sampled layout; `pipeline.make_train_iterator` packs it into training batches.
"""
