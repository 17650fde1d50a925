"""Outputs flushed after a commit: files written only with records whose Kafka transaction
is known to be committed, merged idempotently so a re-flush after a crash changes nothing."""
