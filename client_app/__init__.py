"""A hospital's Flower ClientApp: ``client_app.app:app``."""

import time

#: When this package began importing: with :data:`client_app.app.IMPORTED`, what the
#: ClientApp's own imports cost a fresh ClientApp process.
IMPORT_STARTED = time.time()
