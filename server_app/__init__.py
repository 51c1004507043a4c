"""The coordinator's Flower ServerApp: ``server_app.app:app``."""
