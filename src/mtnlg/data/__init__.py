"""Token data: text -> shards (prepare), the shard format (indexed), training samples (loader), default corpus."""
