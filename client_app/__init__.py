"""A hospital's Flower ClientApp: ``client_app.app:app``."""
