"""Running the pipeline: settings, local Kafka and registry, topology, supervisor, status."""
