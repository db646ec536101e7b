"""What a run can record: the timeline of its streams and the routing decisions it made."""
