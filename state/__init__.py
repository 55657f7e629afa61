"""Every durable byte: the SQLite database, the job queue, the model registry and the state folder."""
