"""The job spec and every path in it: YAML in, a validated frozen JobSpec out (no Ray, no I/O beyond the job file)."""
