"""The wire format: Avro serde, the C codec, the registry client, schema checks."""
