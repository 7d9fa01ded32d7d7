"""The durable node state: models, schema and migrations, the store. All SQL lives here. Imported by every process."""
