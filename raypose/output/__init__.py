"""A job's output folder, the write side: the shard writer and resume."""
