"""The former module of :class:`CHTssController` (``CHTssScheduler``); old imports keep working."""

from leanformers.chts.controller import STATE_NAME, CHTssController, CHTssScheduler, check_unsharded

__all__ = ["STATE_NAME", "CHTssController", "CHTssScheduler", "check_unsharded"]
