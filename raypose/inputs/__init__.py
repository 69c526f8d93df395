"""What a job reads: storage options, image listing, bytes, containers (tar, Parquet) and boxes."""
