"""The review side: reading a job's output back, inspect's summary, exports and the QA page; it never writes the keypoint table."""
