"""The embedtune process: watcher, workers, scheduler, service lifecycle and CLI."""
