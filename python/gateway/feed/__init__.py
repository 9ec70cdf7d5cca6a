"""What the workers read: the WAL tailer (embedded), the Kafka relay and consumer (cluster)."""
