"""The project's logger: our lines only (no root handler, so library chatter stays quiet)."""

import logging

_FORMAT = "%(levelname)s edge-lam: %(message)s"


def get_logger() -> logging.Logger:
    logger = logging.getLogger("edge_lam")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
