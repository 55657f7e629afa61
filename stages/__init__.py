"""Pipeline steps as plain functions over plain data; no database, no threads, no global state."""
