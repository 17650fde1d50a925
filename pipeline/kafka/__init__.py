"""Every contact with the Kafka client: configs, the catalog, admin, readers, dead letters."""
