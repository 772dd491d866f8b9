"""Celery workers: the app and task, the asyncio bridge, the batch deliverer."""
