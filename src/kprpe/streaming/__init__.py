"""Task-neutral streaming: files and videos -> work in worker processes -> batched model calls
(:mod:`.stream`), video frames sampled by time (:mod:`.video`), resumable shard outputs (:mod:`.shards`)."""
