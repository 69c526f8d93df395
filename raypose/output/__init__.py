"""A job's output folder: the shard writer, resume, reading outputs back, summary, export, render."""
